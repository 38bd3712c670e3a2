"""`implicit-lm refresh-remote-code`: a folder's code and config become the package's, every other file is kept, and
the code stays as the folder holds it (copies, or links into the package as the repository's models/ do) unless
`--code` says otherwise. A checkout that stored the links as text is named, with the fix, instead of failing inside
transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import ROOT, run_module, tiny_mamba2
from safetensors.torch import load_file

from implicit_lm.cli import InputError
from implicit_lm.files import foreign_entries, is_package_code_link, unresolved_code_links
from implicit_lm.models import load_model

MODULE = "implicit_lm.conversion.refresh_remote_code"
PACKAGE = ROOT / "modeling_implicit"


@pytest.fixture
def folder(tmp_path) -> Path:
    """A tiny Mamba2 folder as an older release wrote it: stale code, an old auto_map, and files of its own."""
    folder = tmp_path / "tiny-mamba2"
    tiny_mamba2().save_pretrained(folder)
    (folder / "solver.py").write_text((folder / "solver.py").read_text() + "\n# an older release\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "modeling_implicit_mamba2.Outdated"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "state_tracking.json").write_text('{"rows": []}\n')
    return folder


def code_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("*.py"))


def test_copies_stay_copies_and_everything_else_is_kept(folder):
    weights = load_file(folder / "model.safetensors")
    assert run_module(MODULE, str(folder)) == 0
    assert code_files(folder) and all(not (folder / name).is_symlink() for name in code_files(folder))
    for name in code_files(folder):
        assert (folder / name).read_bytes() == (PACKAGE / name).read_bytes(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_implicit_mamba2.ImplicitMamba2Model"
    assert (folder / "state_tracking.json").read_text() == '{"rows": []}\n'
    after = load_file(folder / "model.safetensors")
    assert after.keys() == weights.keys() and all((after[k] == weights[k]).all() for k in weights)


def test_links_are_relative_stay_links_and_turn_back_into_copies(folder, tmp_path):
    assert run_module(MODULE, "--code", "link", str(folder)) == 0
    names = code_files(folder)
    assert names and all(is_package_code_link(folder / name) for name in names)
    assert all(not os.path.isabs(os.readlink(folder / name)) for name in names)
    # A folder that links keeps linking, also on a plain refresh; and it is still ours for `--overwrite`.
    assert run_module(MODULE, str(folder)) == 0
    assert all(is_package_code_link(folder / name) for name in code_files(folder)) and code_files(folder) == names
    assert foreign_entries(folder) == []
    model, _ = load_model(str(folder))
    assert type(model).__name__ == "ImplicitMamba2ForCausalLM"

    assert run_module(MODULE, "--code", "copy", str(folder)) == 0
    assert all(not (folder / name).is_symlink() for name in code_files(folder))
    assert all((folder / name).read_bytes() == (PACKAGE / name).read_bytes() for name in code_files(folder))
    # Only links to the package's own module of that name are ours: any other symlink is foreign.
    (folder / "kernels.py").unlink()
    (folder / "kernels.py").symlink_to(PACKAGE / "solver.py")
    assert foreign_entries(folder) == ["kernels.py"]


def test_links_stored_as_text_are_named_with_the_fix(folder):
    """git on Windows without core.symlinks checks a link out as a one-line file holding its target."""
    for name in ("solver.py", "kernels.py"):
        (folder / name).write_text(f"../../modeling_implicit/{name}")
    problem = unresolved_code_links(folder)
    assert problem == (
        f"{folder}: kernels.py, solver.py hold a symlink's target as text, not code (a checkout made without symlinks, "
        f"e.g. git on Windows without core.symlinks); run `implicit-lm refresh-remote-code {folder}` to write the code "
        "into the folder, or clone with `git clone -c core.symlinks=true`")
    with pytest.raises(InputError) as raised:
        load_model(str(folder))
    assert str(raised.value) == problem
    assert run_module(MODULE, str(folder)) == 0  # the fix the message gives
    assert unresolved_code_links(folder) is None
    assert (folder / "solver.py").read_bytes() == (PACKAGE / "solver.py").read_bytes()
    load_model(str(folder))


def test_a_folder_without_config_is_refused_untouched(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "solver.py").write_text("my own solver\n")
    with pytest.raises(Exception, match="is not a model folder: it has no config.json"):
        run_module(MODULE, str(folder))
    assert [p.name for p in folder.iterdir()] == ["solver.py"]
    assert (folder / "solver.py").read_text() == "my own solver\n"


def test_the_repositorys_models_hold_one_copy_of_the_code():
    """Every remote-code file under models/ is a relative link to the package's module of that name."""
    files = sorted((ROOT / "models").glob("*/*.py"))
    assert files
    for path in files:
        assert is_package_code_link(path), path
        assert not os.path.isabs(os.readlink(path)), path
