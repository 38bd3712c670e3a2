"""Publish a converted folder to the Hugging Face Hub in one commit, after validating it.

    implicit-lm publish --folder DST --repo-id ORG/NAME [--private] [--revision BRANCH]
        [--commit-message MSG] [--dry-run]

Validation (also the whole of `--dry-run`, which needs no network): the config loads as one of our configs and has
an `auto_map` whose code files are present, the model card has valid metadata, the safetensors index matches the
shard files and their tensors, and no file exceeds the Hub's per-file limit. The dry run prints the exact
operations it would send.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from implicit_lm.model_cards import validate_model_card
from safetensors import safe_open

from modeling_implicit import ImplicitLlamaConfig, ImplicitMamba2Config

logger = logging.getLogger("implicit_lm.conversion")

_CONFIGS = {config.model_type: config for config in (ImplicitMamba2Config, ImplicitLlamaConfig)}
HUB_FILE_LIMIT = 50 * 1000**3  # bytes; the Hub rejects larger files
_RELATIVE_IMPORT = re.compile(r"^from \.(\w+) import", re.MULTILINE)


class PublishError(ValueError):
    """The folder is not a complete, consistent repo; the message lists every problem."""


def validate_folder(folder: str | Path) -> list[tuple[str, int]]:
    """Check `folder` is a complete repo; return its files as `(relative path, size in bytes)`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder")
    problems: list[str] = []
    config_path = folder / "config.json"
    if not config_path.is_file():
        problems.append("config.json is missing")
    else:
        config = json.loads(config_path.read_text())
        config_class = _CONFIGS.get(config.get("model_type"))
        if config_class is None:
            problems.append(f"config.json model_type={config.get('model_type')!r} is not one of {sorted(_CONFIGS)}")
        else:
            try:
                config_class.from_pretrained(folder)
            except (ValueError, TypeError) as error:
                problems.append(f"config.json does not load: {error}")
        auto_map = config.get("auto_map") or {}
        if "AutoModelForCausalLM" not in auto_map or "AutoConfig" not in auto_map:
            problems.append("config.json auto_map lacks AutoConfig/AutoModelForCausalLM (remote code would not load)")
        for reference in auto_map.values():
            module = reference.split("--")[-1].rsplit(".", 1)[0]
            if not (folder / f"{module}.py").is_file():
                problems.append(f"auto_map names {reference} but {module}.py is missing")
        # The remote code imports its siblings relatively; each must be in the folder.
        for code in sorted(folder.glob("*.py")):
            for sibling in sorted(set(_RELATIVE_IMPORT.findall(code.read_text()))):
                if not (folder / f"{sibling}.py").is_file():
                    problems.append(f"{code.name} imports .{sibling} but {sibling}.py is missing")
    readme = folder / "README.md"
    if not readme.is_file():
        problems.append("README.md (model card) is missing")
    else:
        try:
            validate_model_card(readme.read_text())
        except ValueError as error:
            problems.append(f"README.md: {error}")
    problems += _check_weights(folder)
    files = sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
    problems += [f"{name} is {size / 1e9:.1f} GB, over the Hub's 50 GB per-file limit"
                 for name, size in files if size > HUB_FILE_LIMIT]
    if problems:
        raise PublishError(f"{folder} is not ready to publish:\n  " + "\n  ".join(problems))
    return files


def _check_weights(folder: Path) -> list[str]:
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    index_path = folder / "model.safetensors.index.json"
    if not shards:
        return ["no .safetensors weights"]
    if not index_path.is_file():
        return [] if shards == ["model.safetensors"] else [f"several shards {shards} but no model.safetensors.index.json"]
    weight_map = json.loads(index_path.read_text()).get("weight_map", {})
    problems = []
    listed = set(weight_map.values())
    problems += [f"index lists {name}, which is missing" for name in sorted(listed - set(shards))]
    problems += [f"{name} is not in the index" for name in sorted(set(shards) - listed)]
    for name in sorted(listed & set(shards)):
        with safe_open(str(folder / name), framework="pt") as handle:
            stored = set(handle.keys())
        indexed = {key for key, file in weight_map.items() if file == name}
        if stored != indexed:
            problems.append(
                f"{name}: index and file disagree (only in index: {sorted(indexed - stored)}, "
                f"only in file: {sorted(stored - indexed)})"
            )
    return problems


def publish(args: argparse.Namespace) -> list[str]:
    """Validate, then create the repo (and branch) and upload the folder in one commit. Returns the operations."""
    files = validate_folder(args.folder)
    message = args.commit_message or f"Upload {Path(args.folder).name} with implicit-lm"
    operations = [f"create_repo(repo_id={args.repo_id!r}, repo_type='model', private={args.private}, exist_ok=True)"]
    if args.revision:
        operations.append(f"create_branch(repo_id={args.repo_id!r}, branch={args.revision!r}, exist_ok=True)")
    operations.append(
        f"upload_folder(repo_id={args.repo_id!r}, folder_path={str(args.folder)!r}, revision={args.revision!r}, "
        f"commit_message={message!r}) with {len(files)} files, {sum(s for _, s in files) / 1e6:.1f} MB:"
    )
    operations += [f"  {name} ({size} bytes)" for name, size in files]
    if args.dry_run:
        return operations

    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id=args.repo_id, repo_type="model", private=args.private, exist_ok=True)
    if args.revision:
        api.create_branch(repo_id=args.repo_id, branch=args.revision, exist_ok=True)
    api.upload_folder(
        repo_id=args.repo_id, folder_path=str(args.folder), revision=args.revision, commit_message=message
    )
    return operations


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="implicit-lm publish", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folder", required=True, type=Path)
    parser.add_argument("--repo-id", required=True, help="ORG/NAME")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to upload to (created if missing)")
    parser.add_argument("--commit-message")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the operations; no network")
    args = parser.parse_args(argv)
    if args.repo_id.count("/") != 1:
        parser.error(f"--repo-id {args.repo_id!r}: expected ORG/NAME")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        operations = publish(args)
    except PublishError as error:
        logger.error("error: %s", error)
        sys.exit(1)
    header = "Dry run, would send:" if args.dry_run else "Sent:"
    print("\n".join([header, *operations]))


if __name__ == "__main__":
    main()
