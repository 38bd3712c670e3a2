"""Bring Hub-layout folders written by an earlier release up to this package's remote code.

    implicit-lm refresh-remote-code models/implicit-mamba2-a5 models/mamba2-16layer-a5

Each folder is loaded with this package's classes and saved again: its modeling files and `config.json` (with the
current `auto_map`) are rewritten, and every other file (weights, tokenizer, card, recorded figures) is kept as it
is. The weights are checked to survive the round trip unchanged, and the folder is replaced atomically.

A folder whose remote code links to this package's modules (the repository's `models/`: one copy of the code in the
repository) keeps linking it, also for modules added since, and a folder of copies keeps copies. `--code link` turns
copies into relative links (for a folder inside this source checkout, e.g. after `--bundle-dir models`); `--code copy`
writes copies (for a folder to hand on, or a checkout whose links git stored as text: Windows without
`core.symlinks`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoConfig

import modeling_implicit  # noqa: F401  (registers the configurations)
from implicit_lm.files import atomic_output, is_package_code_link, package_code_dir

from .reference import ConversionError, model_class

REWRITTEN = ("config.json",)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


def refresh_remote_code(folder: str | Path, code: str | None = None) -> list[str]:
    """Rewrite `folder`'s remote code and config with this package's; returns the names of the files rewritten. The
    code is written as `code`: "copy", "link" (relative symlinks into this package) or None (as the folder has it)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} is not a model folder: it has no config.json")
    if code not in (None, "copy", "link"):
        raise ValueError(f"code={code!r}: choose 'copy', 'link' or None")
    link = code == "link" or (code is None and any(is_package_code_link(path) for path in folder.glob("*.py")))
    config = AutoConfig.from_pretrained(folder)
    model = model_class(config).from_pretrained(folder, dtype=config.dtype)
    package = package_code_dir()
    with tempfile.TemporaryDirectory() as scratch:
        saved = Path(scratch)
        model.save_pretrained(saved)
        before, after = _weights(folder), _weights(saved)
        changed = sorted(name for name in before.keys() | after.keys()
                         if name not in before or name not in after or not torch.equal(before[name], after[name]))
        if changed:
            raise ConversionError(f"{folder}: the weights do not survive a reload unchanged: {changed}")
        rewritten = [*REWRITTEN, *sorted(path.name for path in saved.glob("*.py"))]
        with atomic_output(folder, folder=True) as staging:
            # symlinks=True: a link is copied as a link, never swapped for a copy of what it points to.
            shutil.copytree(folder, staging, dirs_exist_ok=True, symlinks=True)
            for stale in staging.glob("*.py"):
                stale.unlink()
            for name in rewritten:
                if link and name.endswith(".py"):
                    # Relative to the folder's own place (the staging folder is its sibling), so that a moved
                    # checkout keeps working.
                    (staging / name).symlink_to(os.path.relpath(package / name, folder.resolve()))
                else:
                    shutil.copy2(saved / name, staging / name)
    return rewritten


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="implicit-lm refresh-remote-code", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="Hub-layout model folders to refresh in place")
    parser.add_argument("--code", choices=("copy", "link"),
                        help="write the code as copies, or as relative symlinks into this package (default: as each "
                             "folder has it)")
    args = parser.parse_args(argv)
    for folder in tqdm(args.folders, desc="refreshing", unit="folder"):
        refresh_remote_code(folder, code=args.code)


if __name__ == "__main__":
    main()
