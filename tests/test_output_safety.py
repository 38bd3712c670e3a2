"""A user's data is never lost to a command that writes: destinations never swallow inputs, `--overwrite` replaces only
what this package wrote, killed runs leave nothing behind that the next run does not clean up, broken source files are
named before any work, and outputs get the usual permissions."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from implicit_lm.conversion.reference import ConversionError, write_reference_checkpoint
from implicit_lm.files import atomic_output, foreign_entries, remove_stale_partials
from safetensors.torch import save_file
from test_conversion import run_convert, tiny_reference

pytestmark = pytest.mark.usefixtures("verify_in_process")


def convert_main(*argv: str) -> int:
    """`implicit-lm convert ARGV` in this process; its exit status."""
    from implicit_lm.conversion import convert_reference

    try:
        convert_reference.main(list(argv))
    except SystemExit as exit_:
        return exit_.code
    return 0


@pytest.fixture
def source(tmp_path) -> Path:
    """A reference checkpoint at `tmp_path/parent/src`, with an unrelated user file beside it."""
    folder = tmp_path / "parent" / "src"
    write_reference_checkpoint(tiny_reference("mamba2-implicit"), folder)
    (tmp_path / "parent" / "notes.txt").write_text("mine")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["parent", "itself", "inside"])
def test_convert_never_writes_over_or_around_its_source(source, where, caplog):
    before = snapshot(source.parent)
    destination = {"parent": source.parent, "itself": source, "inside": source / "converted"}[where]
    assert convert_main("--src", str(source), "--dst", str(destination), "--overwrite") == 1
    message = caplog.text
    assert "--dst" in message and str(source.resolve()) in message or "--src itself" in message
    assert snapshot(source.parent) == before  # the checkpoint and the user's notes are untouched
    assert not (source / "converted").exists()


def test_import_pretrained_never_writes_over_its_source(tmp_path, caplog):
    from implicit_lm.conversion import import_pretrained

    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        import_pretrained.main(["--src", str(source), "--dst", str(source), "--overwrite"])
    assert exit_.value.code == 1 and "is --src itself" in caplog.text
    assert (source / "config.json").read_text() == "{}"


def test_overwrite_replaces_only_a_folder_this_package_wrote(source, tmp_path, caplog):
    user_folder = tmp_path / "results"
    user_folder.mkdir()
    (user_folder / "thesis.tex").write_text("years of work")
    assert convert_main("--src", str(source), "--dst", str(user_folder), "--overwrite") == 1
    assert "thesis.tex" in caplog.text and "not a model folder written by implicit-lm" in caplog.text
    assert (user_folder / "thesis.tex").read_text() == "years of work"

    ours = tmp_path / "converted"
    run_convert("--src", str(source), "--dst", str(ours))
    assert foreign_entries(ours) == []
    (ours / "my_eval.csv").write_text("a user's file added later")
    with pytest.raises(FileExistsError, match="my_eval.csv"):
        run_convert("--src", str(source), "--dst", str(ours), "--overwrite")
    assert (ours / "my_eval.csv").exists()
    (ours / "my_eval.csv").unlink()
    run_convert("--src", str(source), "--dst", str(ours), "--overwrite")  # our own output is replaced
    assert (ours / "config.json").is_file()


@pytest.mark.e2e  # real processes, killed or launched by accelerate
def test_a_killed_conversion_leaves_staging_that_the_next_run_removes(source, tmp_path):
    """A real conversion process, killed with SIGKILL while its output is being verified (in a fresh interpreter,
    several seconds), leaves its staging folder; the next conversion to the same place removes it and says so."""
    destination = tmp_path / "out" / "model"
    command = [sys.executable, "-m", "implicit_lm.conversion.convert_reference", "--src", str(source), "--dst",
               str(destination)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    staging = []
    while not staging and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
        staging = [p for p in destination.parent.glob(".model.partial-*") if (p / "config.json").is_file()]
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the conversion finished before it could be killed"
    assert staging and staging[0].exists() and not destination.exists()

    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"Removed {staging[0]}, left by a killed run" in result.stderr
    assert sorted(p.name for p in destination.parent.iterdir()) == ["model"]


def test_stale_staging_of_live_processes_is_kept_and_a_parked_folder_is_restored(tmp_path):
    destination = tmp_path / "model"
    live = tmp_path / f".model.partial-{os.getpid()}-abcdefgh"  # another run, still writing
    dead = tmp_path / ".model.partial-999999999-abcdefgh"
    legacy = tmp_path / ".model.partial-k3j_9x2a"  # an earlier release's name, without the pid
    unrelated = tmp_path / ".modelling.partial-999999999-abcdefgh"
    for folder in (live, dead, legacy, unrelated):
        folder.mkdir()
    parked = tmp_path / ".model.replaced-999999999"  # killed between parking the old output and renaming the new in
    parked.mkdir()
    (parked / "config.json").write_text("{}")

    removed = remove_stale_partials(destination)
    assert sorted(p.name for p in removed) == sorted([dead.name, legacy.name])
    assert live.exists() and unrelated.exists() and not dead.exists()
    assert (destination / "config.json").read_text() == "{}"  # the old output is back in place


def test_outputs_get_the_usual_permissions(source, tmp_path):
    previous = os.umask(0o022)
    try:
        run_convert("--src", str(source), "--dst", str(tmp_path / "converted"))
        with atomic_output(tmp_path / "result.json") as staging:
            staging.write_text("{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "converted").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "converted").iterdir()} == {0o644}
    assert (tmp_path / "result.json").stat().st_mode & 0o777 == 0o644


def rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = edit(json.loads(data[8:8 + size]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size:])


def overlapping(header: dict) -> dict:
    names = [k for k in header if k != "__metadata__"]
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
    return header


BROKEN_FILES = {
    "overlapping tensors": (lambda p: rewrite_header(p, overlapping), "invalid offset"),
    "a header of 10^12 bytes": (lambda p: p.write_bytes((10**12).to_bytes(8, "little") + p.read_bytes()[8:]),
                                "header too large"),
    "a truncated file": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "incomplete metadata"),
}


@pytest.mark.parametrize("damage", sorted(BROKEN_FILES))
def test_broken_safetensors_are_refused_naming_the_file(source, tmp_path, damage):
    breaking, reason = BROKEN_FILES[damage]
    breaking(source / "model.safetensors")
    with pytest.raises(ConversionError) as error:
        run_convert("--src", str(source), "--dst", str(tmp_path / "out"))
    assert str(source / "model.safetensors") in str(error.value) and reason in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_nan_source_weight_is_named_before_any_solve(source, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    weights = load_file(source / "model.safetensors")
    name = sorted(weights)[3]
    weights[name][0] = float("nan")
    save_file(weights, source / "model.safetensors")

    def no_solve(*args, **kwargs):
        raise AssertionError("a solve ran")

    monkeypatch.setattr("implicit_lm.conversion.export.verification_logits", no_solve)
    with pytest.raises(ConversionError, match=rf"model.safetensors: {name} holds 1 NaN or infinite value"):
        run_convert("--src", str(source), "--dst", str(tmp_path / "out"))


def test_bad_options_are_refused_before_any_work(source, tmp_path, caplog, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the checkpoint was read")

    monkeypatch.setattr("implicit_lm.conversion.convert_reference.CheckpointReader", no_work)
    for option, value in (("--tolerance", "nan"), ("--tolerance", "-1"), ("--dtype", "float8")):
        caplog.clear()
        assert convert_main("--src", str(source), "--dst", str(tmp_path / "out"), option, value) == 1
        assert option in caplog.text and value in caplog.text
    assert not (tmp_path / "out").exists()


def test_a_diverging_source_is_one_error_line(source, tmp_path, caplog, monkeypatch):
    from modeling_implicit.solver import SolverDivergenceError

    def diverging(*args, **kwargs):
        raise SolverDivergenceError("residual is NaN")

    monkeypatch.setattr("implicit_lm.conversion.export.verification_logits", diverging)
    assert convert_main("--src", str(source), "--dst", str(tmp_path / "out")) == 1
    assert "diverges on the verification input" in caplog.text and not (tmp_path / "out").exists()


def test_a_malformed_source_config_names_the_file(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"backbone_config": ')
    with pytest.raises(ConversionError, match="config.json is not valid JSON"):
        run_convert("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "out"))
