"""`implicit-lm publish`: what it refuses (one `error:` line per problem, naming the file), what it uploads (only the
files of a model repo, plus `--include`), and that the dry run runs every check the upload runs, including the load
through the folder's own remote code in a fresh interpreter."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_module, tiny_llama, tiny_mamba2
from implicit_lm.model_cards import render_model_card
from safetensors.torch import load_file, save_file

from implicit_lm.files import is_model_folder_file

MODULE = "implicit_lm.conversion.publish"
BUNDLED = sorted(p.name for p in (ROOT / "models").iterdir() if p.is_dir())
# Made-up secrets of the shapes the scan looks for (built at run time so this file holds none).
FAKE_HF_TOKEN = "hf_" + "aB3" * 12
FAKE_PRIVATE_KEY = "-----BEGIN OPENSSH " + "PRIVATE KEY-----\nb3BlbnNzaC1rZXk=\n"
FAKE_AWS_KEY = "AKIA" + "ABCDEFGH12345678"
FAKE_GITHUB_TOKEN = "ghp_" + "x1Y2" * 10


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    """A tiny implicit Mamba2 repo (remote code, auto_map, model card) that passes every check; copy it to break it."""
    model = tiny_mamba2()
    folder = tmp_path_factory.mktemp("publish") / "tiny-mamba2"
    model.save_pretrained(folder)
    (folder / "README.md").write_text(render_model_card(model.config, repo_id="org/tiny-mamba2"))
    return folder


@pytest.fixture(scope="module")
def llama_weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(folder)
    return folder / "model.safetensors"


@pytest.fixture
def folder(good_folder, tmp_path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(good_folder, copy)
    return copy


def dry_run(folder: Path, caplog, capsys, *argv: str, repo_id: str = "org/tiny-mamba2") -> tuple[int, list[str], str]:
    """Exit status, the `error:` lines and stdout of `publish --dry-run` on `folder`."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        status = run_module(MODULE, "--folder", str(folder), "--repo-id", repo_id, "--dry-run", *argv)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    return status, errors, capsys.readouterr().out


def listed_files(out: str) -> list[str]:
    """The files the operations listing says it uploads (`  NAME (SIZE bytes)` lines)."""
    return [line.strip().rsplit(" (", 1)[0] for line in out.splitlines() if line.startswith("  ")]


def sparse_file(size: int) -> Callable[[Path, str], None]:
    def write(folder: Path, name: str) -> None:
        with open(folder / name, "wb") as handle:
            handle.truncate(size)  # no blocks on disk: fast to make, but its size is what it reports

    return write


def truncate_weights(folder: Path, llama_weights: Path) -> None:
    path = folder / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)


def nan_weights(folder: Path, llama_weights: Path) -> None:
    path = folder / "model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(path).items()}, path, {"format": "pt"})


def llama_weights_in_mamba2_folder(folder: Path, llama_weights: Path) -> None:
    shutil.copy(llama_weights, folder / "model.safetensors")


def solver_raises_on_import(folder: Path, llama_weights: Path) -> None:
    with open(folder / "solver.py", "a") as handle:
        handle.write('\nraise RuntimeError("solver broken on purpose")\n')


def stray_big_npy(folder: Path, llama_weights: Path) -> None:
    sparse_file(300 * 10**6)(folder, "big.npy")


def stray_big_bin(folder: Path, llama_weights: Path) -> None:
    sparse_file(300 * 10**6)(folder, "data.bin")


def env_with_token(folder: Path, llama_weights: Path) -> None:
    (folder / ".env").write_text(f"HF_TOKEN={FAKE_HF_TOKEN}\n")


def ssh_key(folder: Path, llama_weights: Path) -> None:
    (folder / "id_ed25519").write_text(FAKE_PRIVATE_KEY)


def symlink_outside(folder: Path, llama_weights: Path) -> None:
    outside = folder.parent / "outside.json"
    outside.write_text("{}")
    (folder / "extra.json").symlink_to(outside)


def symlink_inside(folder: Path, llama_weights: Path) -> None:
    (folder / "vocab.json").symlink_to(folder / "config.json")


def checkpoint_with_pickles(folder: Path, llama_weights: Path) -> None:
    (folder / "checkpoint-30").mkdir()
    for name in ("optimizer.pkl", "rng_state.pkl", "scheduler.pkl"):
        (folder / "checkpoint-30" / name).write_bytes(pickle.dumps({"step": 30}))


def extra_pytorch_model_bin(folder: Path, llama_weights: Path) -> None:
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")


def config_not_json(folder: Path, llama_weights: Path) -> None:
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"model_type"', '"model_type" "', 1))


def config_not_an_object(folder: Path, llama_weights: Path) -> None:
    (folder / "config.json").write_text("[1, 2]")


def config_unknown_model_type(folder: Path, llama_weights: Path) -> None:
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"implicit_mamba2"', '"mamba3"'))


def config_invalid_value(folder: Path, llama_weights: Path) -> None:
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"solver": "picard"', '"solver": "newton"'))


def token_in_readme(folder: Path, llama_weights: Path) -> None:
    with open(folder / "README.md", "a") as handle:
        handle.write(f"\nLoad it with `token='{FAKE_HF_TOKEN}'`.\n")


def private_key_in_code(folder: Path, llama_weights: Path) -> None:
    with open(folder / "numerics.py", "a") as handle:
        handle.write(f'\nKEY = """{FAKE_PRIVATE_KEY}"""\n')


def aws_key_in_config(folder: Path, llama_weights: Path) -> None:
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace("{", f'{{"note": "{FAKE_AWS_KEY}",', 1))


def github_token_in_generation_config(folder: Path, llama_weights: Path) -> None:
    text = (folder / "generation_config.json").read_text()
    (folder / "generation_config.json").write_text(text.replace("{", f'{{"note": "{FAKE_GITHUB_TOKEN}",', 1))


# How to break the folder, then the file the one error line names and what it says.
BROKEN = {
    "truncated weights": (truncate_weights, "model.safetensors", "not a readable safetensors file"),
    "llama weights in a mamba2 folder": (llama_weights_in_mamba2_folder, "model.safetensors",
                                         "does not match config.json (implicit_mamba2):"),
    "all-NaN weights": (nan_weights, "model.safetensors", "tensors hold NaN or inf"),
    "solver.py raises on import": (solver_raises_on_import, "solver.py",
                                   "does not load through its remote code: RuntimeError: solver broken on purpose"),
    "stray 300 MB .npy": (stray_big_npy, "big.npy", "300.0 MB; not a file of a model repo"),
    "stray 300 MB .bin": (stray_big_bin, "data.bin", "named like *.bin; pickles can run code"),
    ".env with a token": (env_with_token, ".env", "named like .env; may hold secrets"),
    "ssh key": (ssh_key, "id_ed25519", "named like id_ed25519*; may hold secrets"),
    "symlink leaving the folder": (symlink_outside, "extra.json", "outside the folder; symlinks are never uploaded"),
    "symlink inside the folder": (symlink_inside, "vocab.json", "inside the folder; symlinks are never uploaded"),
    "checkpoint folder of pickles": (checkpoint_with_pickles, "checkpoint-30/",
                                     "3 files (optimizer.pkl, rng_state.pkl, scheduler.pkl): pickles can run code"),
    "extra pytorch_model.bin": (extra_pytorch_model_bin, "pytorch_model.bin", "pickles can run code"),
    "config.json not JSON": (config_not_json, "config.json", "invalid JSON: Expecting ':' delimiter"),
    "config.json not an object": (config_not_an_object, "config.json", "expected a JSON object, got list"),
    "config.json unknown model_type": (config_unknown_model_type, "config.json", "model_type='mamba3' is not one of"),
    "config.json invalid value": (config_invalid_value, "config.json", "Invalid config value solver='newton'"),
    "token in README.md": (token_in_readme, "README.md", "looks like a Hugging Face token (line"),
    "private key in code": (private_key_in_code, "numerics.py", "looks like a private key (line"),
    "AWS key in config.json": (aws_key_in_config, "config.json", "looks like an AWS access key (line 1)"),
    "GitHub token in generation_config.json": (github_token_in_generation_config, "generation_config.json",
                                               "looks like a GitHub token (line 1)"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_or_sensitive_folder_fails_with_one_line(case, folder, llama_weights, caplog, capsys):
    breakage, file, problem = BROKEN[case]
    breakage(folder, llama_weights)
    status, errors, out = dry_run(folder, caplog, capsys)
    assert status == 1 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: {folder}/{file}: ") and problem in errors[0], errors[0]
    assert "Traceback" not in errors[0] and "\n" not in errors[0]
    assert "Dry run" not in out


def test_invalid_repo_id_fails_with_one_line(folder, caplog, capsys):
    status, errors, _ = dry_run(folder, caplog, capsys, repo_id="bad repo/x y")
    assert status == 1 and len(errors) == 1, errors
    assert errors[0].startswith("error: --repo-id 'bad repo/x y': Repo id must use alphanumeric chars"), errors[0]
    status, errors, _ = dry_run(folder, caplog, capsys, repo_id="just-a-name")
    assert status == 1 and errors == ["error: --repo-id 'just-a-name': expected ORG/NAME"]


def test_several_problems_are_one_line_each(folder, caplog, capsys):
    env_with_token(folder, None)
    extra_pytorch_model_bin(folder, None)
    (folder / "README.md").unlink()
    status, errors, _ = dry_run(folder, caplog, capsys)
    assert status == 1
    assert sorted(error.split(": ", 2)[1] for error in errors) == [
        f"{folder}/{name}" for name in (".env", "README.md", "pytorch_model.bin")
    ], errors


def test_pickle_content_is_refused_even_when_included(folder, caplog, capsys):
    (folder / "notes.txt").write_bytes(pickle.dumps(["not", "text"], protocol=4))
    torch.save({"x": torch.ones(2)}, folder / "tensors.dat")
    status, errors, _ = dry_run(folder, caplog, capsys, "--include", "*.txt", "--include", "tensors.dat")
    refusal = "pickles can run code when loaded; never uploaded (save tensors as safetensors)"
    assert status == 1 and sorted(errors) == [
        f"error: {folder}/notes.txt: pickle data (protocol 4); {refusal}",
        f"error: {folder}/tensors.dat: a zip holding data.pkl (torch.save); {refusal}",
    ], errors


def test_good_folder_uploads_only_model_files_and_what_include_adds(folder, caplog, capsys):
    (folder / "notes.md").write_text("How this model was trained.\n")
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "upload.lock").write_text("")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    status, errors, _ = dry_run(folder, caplog, capsys)
    assert status == 1 and errors == [
        f"error: {folder}/notes.md: not a file of a model repo; pass --include GLOB to upload it"
    ]

    status, errors, out = dry_run(folder, caplog, capsys, "--include", "notes.*")
    assert status == 0 and errors == [], errors
    model_files = sorted(p.name for p in folder.iterdir() if is_model_folder_file(p.name))
    assert "model.safetensors" in model_files and "solver.py" in model_files and "README.md" in model_files
    assert listed_files(out) == sorted([*model_files, "notes.md"])
    assert out.startswith("Dry run, would send:\ncreate_repo(repo_id='org/tiny-mamba2'")
    assert f"adding {len(model_files) + 1} files from '{folder}'" in out


def test_upload_sends_exactly_the_validated_files(folder, caplog, capsys, monkeypatch):
    from huggingface_hub import HfApi
    from implicit_lm.conversion import export
    from implicit_lm.conversion.export import reload_logits

    (folder / "notes.md").write_text("How this model was trained.\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    calls = []

    def record(name: str) -> Callable:
        def method(self, *args, **kwargs):
            calls.append((name, args, kwargs))

        return method

    for name in ("create_repo", "create_branch", "create_commit", "upload_folder", "upload_file"):
        monkeypatch.setattr(HfApi, name, record(name))
    loaded = []  # what the fresh-interpreter load saw: the upload runs it too

    def spy_reload(repo: Path, dtype: str, workdir: Path):
        loaded.append(sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")))
        return reload_logits(repo, dtype, workdir)

    monkeypatch.setattr(export, "reload_logits", spy_reload)
    env_with_token(folder, None)
    status = run_module(MODULE, "--folder", str(folder), "--repo-id", "org/tiny-mamba2")
    assert status == 1 and calls == [] and loaded == []
    (folder / ".env").unlink()

    status = run_module(MODULE, "--folder", str(folder), "--repo-id", "org/tiny-mamba2", "--revision", "v1",
                        "--include", "notes.md", "--private")
    out = capsys.readouterr().out
    assert status == 0
    assert [name for name, _, _ in calls] == ["create_repo", "create_branch", "create_commit"]
    assert calls[0][2] == {"repo_id": "org/tiny-mamba2", "repo_type": "model", "private": True, "exist_ok": True}
    assert calls[1][2] == {"repo_id": "org/tiny-mamba2", "branch": "v1", "exist_ok": True}
    commit = calls[2][2]
    assert commit["repo_id"] == "org/tiny-mamba2" and commit["revision"] == "v1" and commit["repo_type"] == "model"
    sent = {op.path_in_repo: op.path_or_fileobj for op in commit["operations"]}
    expected = sorted([*(p.name for p in folder.iterdir() if is_model_folder_file(p.name)), "notes.md"])
    assert sorted(sent) == expected == listed_files(out)
    assert all(sent[name] == str(folder / name) for name in sent)
    assert loaded == [expected]
    assert out.startswith("Sent:\n")


def test_remote_code_linked_to_the_package_is_uploaded_as_its_content(folder, caplog, capsys, monkeypatch):
    """The repository's models/ link their code into modeling_implicit/ (one copy); publish sends the modules'
    content, and a link to anything else (even a file of the same name) is still refused."""
    from huggingface_hub import HfApi

    from implicit_lm.files import is_package_code_link

    package = ROOT / "modeling_implicit"
    for name in ("solver.py", "modeling_implicit_mamba2.py"):
        (folder / name).unlink()
        (folder / name).symlink_to(os.path.relpath(package / name, folder))
        assert is_package_code_link(folder / name)
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kwargs: None)
    monkeypatch.setattr(HfApi, "create_commit", lambda self, **kwargs: calls.append(kwargs))
    assert run_module(MODULE, "--folder", str(folder), "--repo-id", "org/tiny-mamba2") == 0
    sent = {op.path_in_repo: op.path_or_fileobj for op in calls[0]["operations"]}
    assert not Path(sent["solver.py"]).is_symlink()
    assert Path(sent["solver.py"]).read_bytes() == (package / "solver.py").read_bytes()

    elsewhere = folder.parent / "kernels.py"
    shutil.copy(package / "kernels.py", elsewhere)
    (folder / "kernels.py").unlink()
    (folder / "kernels.py").symlink_to(elsewhere)
    status, errors, _ = dry_run(folder, caplog, capsys)
    assert status == 1 and errors[0] == (
        f"error: {folder}/kernels.py: a symlink to {elsewhere}, outside the folder; symlinks are never uploaded "
        "(copy the file into the folder)"), errors


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_models_pass_the_dry_run(name, caplog, capsys):
    folder = ROOT / "models" / name
    status, errors, out = dry_run(folder, caplog, capsys, repo_id=f"org/{name}")
    assert status == 0 and errors == [], errors
    files = listed_files(out)
    assert files == sorted(p.name for p in folder.iterdir()) and "model.safetensors" in files
    assert all(is_model_folder_file(file) for file in files)
