"""Publish a converted folder to the Hugging Face Hub in one commit, after validating it.

    implicit-lm publish --folder DST --repo-id ORG/NAME [--private] [--revision BRANCH]
        [--commit-message MSG] [--include GLOB ...] [--dry-run]

Validation (the same for `--dry-run`, which needs no network, and for the upload):

- the repo id is ORG/NAME and valid on the Hub;
- only the files of a model repo are uploaded (config, weights, tokenizer, model card, remote code, the figures our
  experiments bundle); anything else only if an `--include GLOB` matches its path relative to the folder
  (repeatable; `*` also matches `/`). Hidden folders (`.git/`, `.cache/`) are left out, hidden files too unless
  included (e.g. `--include .gitattributes`).
  Refused even with `--include`: symlinks (except remote-code files linking to this package's same-named module,
  as the repository's `models/` hold their code: their content is uploaded), pickles (`*.pkl`, `*.bin`, `*.pt`, ... or pickle content: loading one can
  run code), files that may hold secrets (`.env`, `*.pem`, `*.key`, `id_rsa*`, `.netrc`, ...), and text files to be
  uploaded that contain a token or private key;
- `config.json` loads as one of our configs, with an `auto_map` whose code files (and their relative imports) are
  uploaded; the model card has valid metadata;
- every safetensors file opens and holds only finite values, the index matches the shards, and the tensors' names
  and shapes are those of the model the config describes; no file exceeds the Hub's 50 GB per-file limit;
- once all the above pass: the files to upload load with `AutoModelForCausalLM.from_pretrained(...,
  trust_remote_code=True)` in a fresh interpreter that has only torch and transformers (so the folder's own code
  runs), and a forward pass on a few tokens gives finite logits.

Each problem is one line, `error: FOLDER/FILE: PROBLEM`, and the exit status is 1. Otherwise the exact operations
are printed (`--dry-run`) or sent: the repo and branch are created if missing and exactly the validated files are
committed.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import re
import stat
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from implicit_lm.model_cards import validate_model_card
from safetensors import SafetensorError, safe_open

from implicit_lm.files import is_model_folder_file, is_package_code_link
from modeling_implicit import ImplicitLlamaConfig, ImplicitMamba2Config, ImplicitPreTrainedConfig

from .export import VERIFY_TOKENS, RemoteCodeError, expected_shapes, reload_logits
from .reference import model_class

logger = logging.getLogger("implicit_lm.conversion")

_CONFIGS = {config.model_type: config for config in (ImplicitMamba2Config, ImplicitLlamaConfig)}
HUB_FILE_LIMIT = 50 * 1000**3  # bytes; the Hub rejects larger files
SECRET_SCAN_BYTES = 4 * 1024**2  # of each text file: model cards, configs, code and tokenizers fit in it
_RELATIVE_IMPORT = re.compile(r"^from \.(\w+) import", re.MULTILINE)
_INDEX = "model.safetensors.index.json"
_SECRET_NAMES = (".env", ".env.*", "*.pem", "*.key", "id_rsa*", "id_ed25519*", ".netrc", ".git-credentials")
_PICKLE_NAMES = ("*.pkl", "*.pickle", "*.bin", "*.pt", "*.pth", "*.ckpt")
_SECRET_CONTENT = {
    "a Hugging Face token": re.compile(rb"hf_[A-Za-z0-9]{30,}"),
    "a private key": re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"),
    "an AWS access key": re.compile(rb"AKIA[0-9A-Z]{16}"),
    "a GitHub token": re.compile(rb"gh[pousr]_[A-Za-z0-9]{36,}"),
}
# Why a file is refused, by kind; files of one kind inside one subfolder are reported together.
_REFUSALS = {
    "symlink": "symlinks are never uploaded (copy the file into the folder)",
    "secret": "may hold secrets; never uploaded",
    "pickle": "pickles can run code when loaded; never uploaded (save tensors as safetensors)",
    "special": "not a regular file; never uploaded",
    "foreign": "not a file of a model repo; pass --include GLOB to upload it",
}
_SHOWN = 3  # names listed in a problem before "and N more"

Problem = tuple[str, str]  # (path relative to the folder, "" for the folder itself; what is wrong)


class PublishError(ValueError):
    """The folder or repo id is not ready to publish; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def check_repo_id(repo_id: str) -> list[str]:
    """Problems with `repo_id`: it must be ORG/NAME and pass huggingface_hub's own rules."""
    if repo_id.count("/") != 1:
        return [f"--repo-id {repo_id!r}: expected ORG/NAME"]
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        return [f"--repo-id {repo_id!r}: {_one_line(str(error))}"]
    return []


def validate_folder(folder: str | Path, include: Sequence[str] = ()) -> list[tuple[str, int]]:
    """Check `folder` is a complete, loadable repo and choose what to upload (see the module docstring).

    Returns the files to upload as `(relative path, size in bytes)`, sorted. Raises `PublishError` with one line
    `FOLDER/FILE: PROBLEM` per problem. The fresh-interpreter load runs only once every other check passed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError([f"{folder}: is not a folder"])
    uploads, problems = select_files(folder, include)
    refused = {relative for relative, _ in problems}
    config, config_problems = _check_config(folder, uploads, refused)
    problems += config_problems
    problems += _check_model_card(folder, uploads, refused)
    problems += _check_secret_content(folder, uploads)
    problems += _check_weights(folder, uploads, refused, config)
    problems += [(name, f"{size / 1e9:.1f} GB, over the Hub's 50 GB per-file limit")
                 for name, size in uploads.items() if size > HUB_FILE_LIMIT]
    if not problems:
        problems += _check_remote_code_load(folder, uploads)
    if problems:
        raise PublishError([f"{folder}/{relative}: {message}" if relative else f"{folder}: {message}"
                            for relative, message in problems])
    return sorted(uploads.items())


def select_files(folder: Path, include: Sequence[str] = ()) -> tuple[dict[str, int], list[Problem]]:
    """The files of `folder` to upload (`{relative path: size}`) and the refused ones, one problem per file (files
    of one kind inside one subfolder together). Hidden files are skipped unless included; hidden folders are not
    entered."""
    root = folder.resolve()
    uploads: dict[str, int] = {}
    refused: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (group, kind) -> [(relative, detail)]
    skipped: list[str] = []
    used_patterns: set[str] = set()
    for current, dirnames, filenames in os.walk(folder):  # not following links: a linked folder is refused, not read
        here = Path(current)
        entries = [(name, True) for name in sorted(dirnames)] + [(name, False) for name in sorted(filenames)]
        dirnames.clear()
        for name, is_dir in entries:
            path = here / name
            relative = path.relative_to(folder).as_posix()
            matched = [pattern for pattern in include if fnmatch.fnmatchcase(relative, pattern)]
            used_patterns.update(matched)
            hidden = any(part.startswith(".") for part in relative.split("/"))
            if is_dir and not path.is_symlink():
                if hidden:
                    skipped.append(relative + "/")
                else:
                    dirnames.append(name)
                continue
            if hidden and not matched and not _matches(name, _SECRET_NAMES):
                skipped.append(relative)
                continue
            refusal = _refusal(path, root, bool(matched) or is_model_folder_file(relative))
            if refusal is None:
                uploads[relative] = path.stat().st_size
            else:
                kind, detail = refusal
                group = relative.split("/")[0] + "/" if "/" in relative else relative
                refused.setdefault((group, kind), []).append((relative, detail))
    if skipped:
        logger.info("Not uploading hidden entries: %s", _shown(skipped))
    for pattern in include:
        if pattern not in used_patterns:
            logger.warning("--include %r matches no file in %s", pattern, folder)
    problems = []
    for (group, kind), files in sorted(refused.items()):
        if len(files) == 1:
            relative, detail = files[0]
            problems.append((relative, f"{detail}; {_REFUSALS[kind]}" if detail else _REFUSALS[kind]))
        else:
            names = [relative.removeprefix(group) for relative, _ in files]
            problems.append((group, f"{len(files)} files ({_shown(names)}): {_REFUSALS[kind]}"))
    return uploads, problems


def _refusal(path: Path, root: Path, wanted: bool) -> tuple[str, str] | None:
    """`(kind, detail)` if the file at `path` must not be uploaded, None if it is uploaded: it is `wanted` (a model
    repo file or included) and nothing refuses it."""
    if _matches(path.name, _SECRET_NAMES):
        return "secret", f"named like {_matching(path.name, _SECRET_NAMES)}"
    if path.is_symlink() and not is_package_code_link(path):
        target = os.readlink(path)
        inside = Path(os.path.realpath(path)).is_relative_to(root)
        return "symlink", f"a symlink to {target}, {'inside' if inside else 'outside'} the folder"
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        return "special", ""
    if _matches(path.name, _PICKLE_NAMES):
        return "pickle", f"named like {_matching(path.name, _PICKLE_NAMES)}"
    # safetensors are checked by opening them (their first bytes are a header length, which may look like a pickle).
    if not path.name.endswith(".safetensors"):
        pickle_format = _pickle_content(path)
        if pickle_format:
            return "pickle", pickle_format
    if not wanted:
        return "foreign", f"{info.st_size / 1e6:.1f} MB" if info.st_size >= 10**6 else ""
    return None


def _pickle_content(path: Path) -> str | None:
    """What makes the file's content a pickle (protocol 2-5 opcode, or torch.save's zip holding `data.pkl`)."""
    with open(path, "rb") as handle:
        start = handle.read(2)
    if len(start) == 2 and start[0] == 0x80 and 2 <= start[1] <= 5:
        return f"pickle data (protocol {start[1]})"
    if start == b"PK":
        try:
            with zipfile.ZipFile(path) as archive:
                if any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist()):
                    return "a zip holding data.pkl (torch.save)"
        except (zipfile.BadZipFile, OSError):
            pass
    return None


def _check_config(
    folder: Path, uploads: dict[str, int], refused: set[str]
) -> tuple[ImplicitPreTrainedConfig | None, list[Problem]]:
    """The loaded config (None if it does not load) and the problems of `config.json` and its `auto_map`."""
    if "config.json" not in uploads:
        return None, [] if "config.json" in refused else [("config.json", "missing")]
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        return None, [("config.json", f"invalid JSON: {_one_line(str(error))}")]
    if not isinstance(data, dict):
        return None, [("config.json", f"expected a JSON object, got {type(data).__name__}")]
    config_class = _CONFIGS.get(data.get("model_type"))
    if config_class is None:
        return None, [("config.json", f"model_type={data.get('model_type')!r} is not one of {sorted(_CONFIGS)}")]
    try:
        config = config_class.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001 - any failure to build the config is a bad config; reported as one line
        return None, [("config.json", f"does not load as {config_class.__name__}: {_one_line(str(error))}")]
    problems: list[Problem] = []
    auto_map = data.get("auto_map") or {}
    if not isinstance(auto_map, dict) or "AutoModelForCausalLM" not in auto_map or "AutoConfig" not in auto_map:
        problems.append(("config.json", "auto_map lacks AutoConfig/AutoModelForCausalLM (remote code would not load)"))
        auto_map = auto_map if isinstance(auto_map, dict) else {}
    references = [ref for value in auto_map.values() for ref in (value if isinstance(value, list) else [value])]
    for reference in [ref for ref in references if isinstance(ref, str)]:
        module = reference.split("--")[-1].rsplit(".", 1)[0]
        if f"{module}.py" not in uploads:
            problems.append(("config.json", f"auto_map names {reference} but {module}.py is missing"))
    # The remote code imports its siblings relatively; each must be uploaded too.
    for code in sorted(name for name in uploads if name.endswith(".py") and "/" not in name):
        text = (folder / code).read_text(encoding="utf-8", errors="replace")
        for sibling in sorted(set(_RELATIVE_IMPORT.findall(text))):
            if f"{sibling}.py" not in uploads:
                problems.append((code, f"imports .{sibling} but {sibling}.py is missing"))
    return config, problems


def _check_model_card(folder: Path, uploads: dict[str, int], refused: set[str]) -> list[Problem]:
    if "README.md" not in uploads:
        return [] if "README.md" in refused else [("README.md", "missing (the model card)")]
    try:
        validate_model_card((folder / "README.md").read_text(encoding="utf-8", errors="replace"))
    except ValueError as error:
        return [("README.md", _one_line(str(error)))]
    return []


def _check_secret_content(folder: Path, uploads: dict[str, int]) -> list[Problem]:
    """Tokens and private keys in the text files to upload (the first `SECRET_SCAN_BYTES` of each)."""
    problems = []
    for relative in sorted(uploads):
        if relative.endswith(".safetensors"):
            continue
        with open(folder / relative, "rb") as handle:
            content = handle.read(SECRET_SCAN_BYTES)
        if b"\0" in content[:8192]:  # binary (e.g. a sentencepiece model)
            continue
        found = [(content.count(b"\n", 0, match.start()) + 1, kind)
                 for kind, pattern in _SECRET_CONTENT.items() if (match := pattern.search(content))]
        if found:
            line, kind = min(found)
            problems.append((relative, f"holds what looks like {kind} (line {line}); remove it before publishing"))
    return problems


def _check_weights(
    folder: Path, uploads: dict[str, int], refused: set[str], config: ImplicitPreTrainedConfig | None
) -> list[Problem]:
    """Every safetensors file opens and is finite, the index matches the shards, and the shards match `config`."""
    shards = sorted(name for name in uploads if name.endswith(".safetensors") and "/" not in name)
    problems: list[Problem] = []
    stored: dict[str, dict[str, tuple[int, ...]]] = {}  # readable shard -> {tensor: shape}
    for name in sorted(name for name in uploads if name.endswith(".safetensors")):
        shapes, problem = _read_safetensors(folder / name)
        if problem:
            problems.append((name, problem))
        elif name in shards:
            stored[name] = shapes
    if not shards:
        if not any(name.endswith(".safetensors") and "/" not in name for name in refused):
            problems.append(("model.safetensors", "missing (no .safetensors weights)"))
        return problems
    if _INDEX not in uploads:
        if shards != ["model.safetensors"]:
            problems.append((_INDEX, f"missing, with several shards ({_shown(shards)})"))
        weights_file = shards[0]
    else:
        weights_file = _INDEX
        try:
            weight_map = json.loads((folder / _INDEX).read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as error:
            return [*problems, (_INDEX, f"unreadable: {_one_line(repr(error))}")]
        listed = set(weight_map.values())
        problems += [(_INDEX, f"index lists {name}, which is missing") for name in sorted(listed - set(shards))]
        problems += [(name, "is not in the index") for name in sorted(set(shards) - listed)]
        for name in sorted(listed & set(stored)):
            indexed = {key for key, file in weight_map.items() if file == name}
            if set(stored[name]) != indexed:
                only_index, only_file = sorted(indexed - set(stored[name])), sorted(set(stored[name]) - indexed)
                disagreement = f"only in index: {_shown(only_index)}; only in file: {_shown(only_file)}"
                problems.append((name, f"index and file disagree ({disagreement})"))
    if config is not None and not problems:
        try:
            mismatch = _compare_with_config(config, {k: v for shapes in stored.values() for k, v in shapes.items()})
        except Exception as error:  # noqa: BLE001 - a config that validates but builds no model is a bad config
            return [("config.json", f"no model can be built from it: {_one_line(f'{type(error).__name__}: {error}')}")]
        if mismatch:
            problems.append((weights_file, f"does not match config.json ({config.model_type}): {mismatch}"))
    return problems


def _read_safetensors(path: Path) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """`({tensor: shape}, problem)`: the file must open with safetensors and hold only finite values. Read one
    tensor at a time, so memory stays at the largest tensor."""
    shapes: dict[str, tuple[int, ...]] = {}
    non_finite = []
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()  # a method of the handle, not of a dict
            for key in names:
                tensor = handle.get_tensor(key)
                shapes[key] = tuple(tensor.shape)
                if not torch.isfinite(tensor).all():
                    non_finite.append(key)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        return {}, f"not a readable safetensors file: {_one_line(str(error))}"
    if non_finite:
        return shapes, f"{len(non_finite)} of {len(shapes)} tensors hold NaN or inf ({_shown(non_finite)})"
    return shapes, None


def _compare_with_config(config: ImplicitPreTrainedConfig, stored: dict[str, tuple[int, ...]]) -> str:
    """What differs between the tensors the config's model needs and those stored ("" if nothing)."""
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation cost
        model = model_class(config)(config)
    expected = expected_shapes(model)
    if config.tie_word_embeddings and "lm_head.weight" in stored:  # a tied head may also be written out
        expected["lm_head.weight"] = tuple(model.state_dict()["lm_head.weight"].shape)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    misshaped = [f"{key} {stored[key]} instead of {expected[key]}"
                 for key in sorted(set(expected) & set(stored)) if stored[key] != expected[key]]
    parts = [f"{len(missing)} missing ({_shown(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({_shown(unexpected)})" if unexpected else "",
             f"{len(misshaped)} with other shapes ({_shown(misshaped)})" if misshaped else ""]
    return "; ".join(part for part in parts if part)


def _check_remote_code_load(folder: Path, uploads: dict[str, int]) -> list[Problem]:
    """Load exactly the files to upload (linked into a scratch folder) through their own remote code in a fresh
    interpreter, and run a forward pass: what users of the repo will run."""
    logger.info("Loading %s through its remote code in a fresh interpreter...", folder)
    with tempfile.TemporaryDirectory() as workdir:
        repo = Path(workdir) / "repo" / folder.resolve().name
        for relative in uploads:
            (repo / relative).parent.mkdir(parents=True, exist_ok=True)
            os.symlink((folder / relative).resolve(), repo / relative)
        try:
            logits = reload_logits(repo, "auto", Path(workdir))
        except RemoteCodeError as error:
            return [_summarise_load_failure(error.stderr, uploads)]
    if not torch.isfinite(logits).all():
        weights = _INDEX if _INDEX in uploads else "model.safetensors"
        return [(weights, f"a forward pass on {VERIFY_TOKENS} tokens through its remote code gives NaN/inf logits")]
    return []


def _summarise_load_failure(stderr: str, uploads: dict[str, int]) -> Problem:
    """One line from the child's traceback: its exception, and the deepest frame in one of the folder's files."""
    lines = stderr.rstrip().splitlines() or ["(no output)"]
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    summary = lines[-1].strip()
    if frames:  # the exception line is the first unindented line after the last frame
        summary = next((line for line in lines[frames[-1] + 1:] if line and not line[0].isspace()), summary)
    for i in reversed(frames):  # transformers runs the remote code from its copies under transformers_modules/
        path, line = re.match(r'  File "([^"]+)", line (\d+)', lines[i]).groups()
        if "transformers_modules" in path and Path(path).name in uploads:
            return Path(path).name, f"does not load through its remote code: {summary} (line {line})"
    return "", f"does not load with AutoModelForCausalLM.from_pretrained(trust_remote_code=True): {summary}"


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return _matching(name, patterns) is not None


def _matching(name: str, patterns: Sequence[str]) -> str | None:
    return next((pattern for pattern in patterns if fnmatch.fnmatchcase(name, pattern)), None)


def _shown(names: Sequence[str]) -> str:
    more = len(names) - _SHOWN
    return ", ".join(names[:_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def publish(args: argparse.Namespace) -> list[str]:
    """Validate, then create the repo (and branch) and commit exactly the validated files. Returns the operations."""
    repo_problems = check_repo_id(args.repo_id)
    if repo_problems:  # checked first: instant, while the folder's checks load the model
        raise PublishError(repo_problems)
    folder = Path(args.folder)
    files = validate_folder(folder, include=args.include or ())
    message = args.commit_message or f"Upload {folder.resolve().name} with implicit-lm"
    operations = [f"create_repo(repo_id={args.repo_id!r}, repo_type='model', private={args.private}, exist_ok=True)"]
    if args.revision:
        operations.append(f"create_branch(repo_id={args.repo_id!r}, branch={args.revision!r}, exist_ok=True)")
    operations.append(
        f"create_commit(repo_id={args.repo_id!r}, repo_type='model', revision={args.revision!r}, "
        f"commit_message={message!r}) adding {len(files)} files from {str(folder)!r}, "
        f"{sum(s for _, s in files) / 1e6:.1f} MB:"
    )
    operations += [f"  {name} ({size} bytes)" for name, size in files]
    if args.dry_run:
        return operations

    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo_id=args.repo_id, repo_type="model", private=args.private, exist_ok=True)
    if args.revision:
        api.create_branch(repo_id=args.repo_id, branch=args.revision, exist_ok=True)
    api.create_commit(
        repo_id=args.repo_id,
        repo_type="model",
        operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=_content_path(folder / name))
                    for name, _ in files],
        commit_message=message,
        revision=args.revision,
    )
    return operations


def _content_path(path: Path) -> str:
    """What to read for `path`: a validated link (remote code linking to this package) is sent as its target's
    content, never as a link."""
    return os.path.realpath(path) if path.is_symlink() else str(path)


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(
        prog="implicit-lm publish", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folder", required=True, type=Path)
    parser.add_argument("--repo-id", required=True, help="ORG/NAME")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to upload to (created if missing)")
    parser.add_argument("--commit-message")
    parser.add_argument(
        "--include", action="append", default=[], metavar="GLOB",
        help="also upload files whose path relative to the folder matches GLOB (repeatable); symlinks, pickles and "
             "secrets are refused regardless",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the operations; no network")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        operations = publish(args)
    except PublishError as error:
        for problem in error.problems:
            logger.error("error: %s", problem)
        sys.exit(1)
    header = "Dry run, would send:" if args.dry_run else "Sent:"
    print("\n".join([header, *operations]))
    return operations


if __name__ == "__main__":
    main()
