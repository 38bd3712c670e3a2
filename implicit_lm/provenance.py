"""What a run records beside its results: the command as typed, arguments, date, versions, machine and model."""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from implicit_lm.models import IMPLICIT_MODEL_TYPES, is_implicit


def _command_line() -> str:
    """The command as typed: `python -m implicit_lm.eval.<name> ...` for the eval commands."""
    if not sys.argv:
        return ""
    program = Path(sys.argv[0])
    head = f"python -m implicit_lm.eval.{program.stem}" if program.parent.name == "eval" else program.name
    return " ".join([head, *sys.argv[1:]])


def run_metadata(args: argparse.Namespace, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Who/what/where of a run, stored beside its results."""
    metadata: dict[str, Any] = {
        "command": _command_line(),
        "arguments": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": platform.platform(),
    }
    if model is not None:
        config = model.config
        metadata["model"] = {
            "model_type": config.model_type,
            "implicit": is_implicit(model),
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(next(model.parameters()).device),
        }
        if config.model_type in IMPLICIT_MODEL_TYPES:
            metadata["model"]["solver"] = {
                field: getattr(config, field)
                for field in ("solver", "tolerance", "stop_mode", "eval_max_iterations", "damping", "inference_mode")
            }
    return metadata
