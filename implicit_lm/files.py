"""Writing outputs safely: a file or a folder appears complete or not at all, a destination never swallows an input,
`--overwrite` replaces only what this package wrote, and what killed runs left behind is cleaned up by the next one.

Staging paths are named `.NAME.partial-PID-RANDOM` next to the destination `NAME` (a folder being replaced is parked
as `.NAME.replaced-PID` until the new one is in place); `remove_stale_partials` removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

def package_code_dir() -> Path:
    """The folder of this package's remote code (`modeling_implicit/`), resolved."""
    import modeling_implicit

    return Path(modeling_implicit.__file__).resolve().parent


def _remote_code_files() -> frozenset[str]:
    return frozenset(p.name for p in package_code_dir().glob("*.py") if p.name != "__init__.py")


def is_package_code_link(path: Path) -> bool:
    """Whether `path` is a symlink to the same-named module of this package's remote code: how the repository's
    `models/` folders hold their code (one copy in the repository). Any other symlink is not ours."""
    return (path.is_symlink() and path.name in _remote_code_files()
            and Path(os.path.realpath(path)) == package_code_dir() / path.name)


def unresolved_code_links(folder: Path) -> str | None:
    """What is wrong when remote-code files of `folder` are symlinks that a checkout stored as text (git on Windows
    without `core.symlinks`: a one-line file holding the link's target, which no Python can import); None if none."""
    stubs = []
    for name in sorted(_remote_code_files()):
        path = folder / name
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 256:
            text = path.read_text(errors="replace").strip()
            if "\n" not in text and text.endswith(f"modeling_implicit/{name}"):
                stubs.append(name)
    if not stubs:
        return None
    return (f"{folder}: {', '.join(stubs)} hold a symlink's target as text, not code (a checkout made without "
            f"symlinks, e.g. git on Windows without core.symlinks); run `implicit-lm refresh-remote-code {folder}` "
            "to write the code into the folder, or clone with `git clone -c core.symlinks=true`")


# The files a model folder written by this package may hold (a Hub model repo): config, generation config, weights,
# tokenizer, model card, the remote code, and the figures our experiments bundle with a model. `adapter/` is the LoRA
# adapter `finetune` saves beside the merged weights.
MODEL_FOLDER_PATTERNS = (
    "config.json", "generation_config.json", "README.md",
    "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "state_tracking.json", "stories.json", "language_model.json",
    "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md",
)


def is_model_folder_file(relative: str) -> bool:
    """Whether `relative` (a path inside a model folder, `/`-separated) is a file this package writes there."""
    if relative in _remote_code_files():
        return True
    return any(fnmatch.fnmatchcase(relative, pattern) for pattern in MODEL_FOLDER_PATTERNS)


def foreign_entries(folder: Path) -> list[str]:
    """What in the model folder `folder` this package did not write (relative paths; `[]` for a folder it may
    replace). A folder whose `config.json` names none of our model types is foreign as a whole."""
    from modeling_implicit import IMPLICIT_MODEL_TYPES

    if not folder.is_dir() or folder.is_symlink():
        return [f"{folder.name} (not a folder)"]
    entries = sorted(folder.rglob("*"))
    if not entries:
        return []
    foreign = []
    for path in entries:
        relative = path.relative_to(folder).as_posix()
        if (path.is_symlink() and not is_package_code_link(path)) or (
                path.is_file() and not is_model_folder_file(relative)):
            foreign.append(relative)
        elif path.is_dir() and not any(p.startswith(relative + "/") for p in MODEL_FOLDER_PATTERNS):
            foreign.append(relative + "/")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type not in IMPLICIT_MODEL_TYPES:
        foreign.insert(0, f"config.json (no model of this package: model_type {model_type!r})")
    # A folder inside a foreign subfolder is reported once, through its parent.
    return [entry for entry in foreign if not any(entry != other and entry.startswith(other) and other.endswith("/")
                                                  for other in foreign)]


def check_apart(destination: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Raise `ValueError` if `destination` is, contains or lies inside one of `inputs` (`{option name: path}`): writing
    it would replace or delete that input. Inputs that are None or name no existing path (a Hub id) are skipped."""
    target = Path(destination).resolve()
    for name, source in inputs.items():
        if source is None or not Path(source).exists():
            continue
        source = Path(source).resolve()
        if target == source:
            raise ValueError(f"the destination {destination} is {name} itself; write to another folder")
        if source.is_relative_to(target):
            raise ValueError(f"the destination {destination} contains {name} {source}; writing it would delete it")
        if target.is_relative_to(source):
            raise ValueError(f"the destination {destination} lies inside {name} {source}; write outside it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _staging_pattern(name: str) -> re.Pattern[str]:
    # `.NAME.partial-PID-RANDOM` (this release); `.NAME.partial-RANDOM` from releases that did not record the pid.
    return re.compile(rf"\.{re.escape(name)}\.(partial|replaced)-(?:(\d+)(?:-[\w]+)?|[a-z0-9_]{{8}})(\.[\w.]+)?")


def remove_stale_partials(destination: str | os.PathLike) -> list[Path]:
    """Clean up what killed runs left next to `destination`: staging files and folders of processes that are gone are
    removed, and a folder parked for replacement is put back if the destination is missing. Staging paths of live
    processes (another run writing the same destination) are left alone. Returns the paths removed; logs each."""
    destination = Path(destination).resolve()
    if not destination.parent.is_dir():
        return []
    pattern = _staging_pattern(destination.name)
    removed = []
    for path in sorted(destination.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or (match.group(2) is not None and _process_alive(int(match.group(2)))):
            continue
        if match.group(1) == "replaced" and not destination.exists():
            path.rename(destination)
            logger.warning("Restored %s from %s, left by a run killed while replacing it", destination, path.name)
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        logger.warning("Removed %s, left by a killed run", path)
        removed.append(path)
    return removed


def check_destination(destination: str | os.PathLike, *, folder: bool, overwrite: bool) -> None:
    """Raise `FileExistsError` unless `destination` may be written: it does not exist, or `overwrite` is set and it
    is a file (for a file output) or a folder this package wrote all of (for a folder output; the error names what
    would be lost). Commands call it before their work too, so that a refusal costs nothing."""
    destination = Path(destination)
    if not (destination.exists() or destination.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{destination} exists; pass --overwrite to replace it.")
    if not folder:
        if destination.is_dir():
            raise FileExistsError(f"{destination} is a folder; expected a file path")
        return
    foreign = foreign_entries(destination)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise FileExistsError(
            f"{destination} exists and is not a model folder written by implicit-lm; --overwrite would delete "
            f"{shown}. Remove it yourself or choose another destination."
        )


def give_usual_permissions(path: Path) -> None:
    """Files 0666 and folders 0777 less the umask, for `path` and, for a folder, everything in it: some writers
    (`mkstemp`, `mkdtemp`, temporary files renamed into place such as transformers' and safetensors' weights) leave
    0600/0700, which other users of a shared machine cannot read."""
    mask = _umask()
    for item in (path, *(path.rglob("*") if path.is_dir() else ())):
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_output(destination: str | os.PathLike, *, folder: bool = False, overwrite: bool = True) -> Iterator[Path]:
    """Yield a staging path next to `destination` (an empty folder with `folder=True`, else a file path to write);
    on success it replaces `destination`, on any error it is removed. An existing `destination` is kept unless
    `overwrite`, and is only removed once the new one is in place; a folder is replaced only when this package wrote
    all of it (`foreign_entries`), else `FileExistsError` names what would be lost. Staging left by killed runs is
    removed first. What is written gets the usual permissions (0666 / 0777 less the umask), not `mkstemp`'s 0600."""
    destination = Path(destination).resolve()
    check_destination(destination, folder=folder, overwrite=overwrite)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(destination)
    prefix = f".{destination.name}.partial-{os.getpid()}-"
    if folder:
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=destination.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, suffix=destination.suffix, dir=destination.parent)
        os.close(handle)
        staging = Path(name)
    give_usual_permissions(staging)
    try:
        yield staging
    except BaseException:
        if folder:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
        raise
    if not folder:
        os.replace(staging, destination)  # atomic for a file, also over an existing one
        return
    give_usual_permissions(staging)  # what was written into it
    backup = None
    if destination.exists():
        backup = destination.parent / f".{destination.name}.replaced-{os.getpid()}"
        destination.rename(backup)
    staging.rename(destination)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(staging_path)` writes the file; it then replaces `path` (see `atomic_output`)."""
    with atomic_output(path) as staging:
        write(staging)


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write `payload` as indented JSON; the file appears complete or not at all. NaN/inf are rejected."""
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda temporary: temporary.write_text(text))
    logger.info("Wrote %s", path)
