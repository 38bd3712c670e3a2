"""Loading a model for evaluation or training (ours through remote code, or any transformers causal LM as a
baseline), and running it with per-call solver settings."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from implicit_lm.cli import InputError
from implicit_lm.files import unresolved_code_links
from modeling_implicit import IMPLICIT_MODEL_TYPES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# Below this width an op of a decode step is microseconds of work: a second intra-op thread adds a barrier per op, and
# on a loaded machine every barrier waits for whichever thread the scheduler has descheduled. Measured with the bundled
# S5 model (hidden 128) beside two busy processes of the same kind: 19.6x slower than idle with 2 threads, 4.3x with
# one (docs/BENCHMARKS.md); idle, one thread costs 7.8 s where two take 5.7-7.3 s.
SMALL_MODEL_WIDTH = 512


def threads_for_width(hidden_size: int) -> int:
    """The intra-op threads that suit a model of width `hidden_size`: one below `SMALL_MODEL_WIDTH`, torch's current
    setting otherwise."""
    return 1 if hidden_size < SMALL_MODEL_WIDTH else torch.get_num_threads()


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def is_implicit(model: torch.nn.Module) -> bool:
    """Whether `model` is one of ours (also when loaded as remote code, whose classes live in `transformers_modules`)
    and runs the solver (`implicit=True`)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in IMPLICIT_MODEL_TYPES and bool(getattr(config, "implicit", False))


def load_model(
    name: str, *, dtype: str = "float32", device: str = "cpu", overrides: dict[str, Any] | None = None
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM (ours through remote code, or any transformers model as a baseline) in eval mode, with the
    solver `overrides` applied to its config, and its tokenizer (None when the folder has none)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    overrides = dict(overrides or {})
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if os.path.sep in name or name.startswith("."):
        if not Path(name).is_dir():
            raise InputError(f"Model folder {name} does not exist")
        if not (Path(name) / "config.json").is_file():
            raise InputError(f"{name} has no config.json: not a Hub-layout model folder")
        problem = unresolved_code_links(Path(name))
        if problem:
            raise InputError(problem)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=True)
    except Exception as error:  # missing, offline, unknown model type
        raise InputError(f"Cannot load the config of {name!r}: {error}") from error
    if overrides and config.model_type not in IMPLICIT_MODEL_TYPES:
        raise InputError(
            f"{name} is a {config.model_type!r} model, not an implicit one: the solver options "
            f"{sorted(overrides)} do not apply to it"
        )
    try:
        for field, value in overrides.items():
            setattr(config, field, value)
        if hasattr(config, "validate"):
            config.validate()
    except ValueError as error:
        raise InputError(str(error)) from error
    try:
        model = AutoModelForCausalLM.from_pretrained(name, config=config, trust_remote_code=True, dtype=DTYPES[dtype])
    except Exception as error:
        raise InputError(f"Cannot load the model {name!r}: {error}") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=True)
    except Exception:  # a folder without tokenizer files: token-id data still works
        tokenizer = None
    return model.to(device).eval(), tokenizer


@contextlib.contextmanager
def model_fields(model: torch.nn.Module, **fields: Any) -> Iterator[None]:
    """Temporarily set config fields that change the function a model computes (`implicit`, the Mamba2 noise
    fields), which no per-call override covers. Solver settings go through `solver_kwargs` instead."""
    from modeling_implicit.configuration_implicit import SOLVER_OVERRIDE_FIELDS

    solver_fields = sorted(set(fields) & set(SOLVER_OVERRIDE_FIELDS))
    if solver_fields:
        raise ValueError(f"{solver_fields} are solver settings: pass them per call with solver_kwargs")
    saved = {name: getattr(model.config, name) for name in fields}
    for name, value in fields.items():
        setattr(model.config, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(model.config, name, value)


def solver_kwargs(model: torch.nn.Module, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments that run one call of `model` with these solver settings (`model(x, **solver_kwargs(model,
    inference_mode="sequential"))`), leaving its config alone; nothing for a model that is not ours (a transformers
    baseline), which has no solver."""
    config = getattr(model, "config", None)
    if not overrides or getattr(config, "model_type", None) not in IMPLICIT_MODEL_TYPES:
        return {}
    return {"solver_overrides": overrides}
