"""Writing results so that a file or a folder appears complete or not at all: never a half-written output."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_output(destination: str | os.PathLike, *, folder: bool = False, overwrite: bool = True) -> Iterator[Path]:
    """Yield a staging path next to `destination` (an empty folder with `folder=True`, else a file path to write);
    on success it replaces `destination`, on any error it is removed. An existing `destination` is kept unless
    `overwrite`, and is only removed once the new one is in place."""
    destination = Path(destination).resolve()
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} exists; pass --overwrite to replace it.")
    destination.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=destination.suffix,
                                        dir=destination.parent)
        os.close(handle)
        staging = Path(name)
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
