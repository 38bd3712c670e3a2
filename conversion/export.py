"""Writing a model as a complete Hub repo folder and verifying it through remote code."""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from implicit_lm.files import atomic_output, check_apart, check_destination, remove_stale_partials
from modeling_implicit import ImplicitPreTrainedConfig
from modeling_implicit.solver import SolverDivergenceError

from .reference import ConversionError, model_class

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Verification runs a fixed number of solver iterations on a few tokens: deterministic, cheap at any size, and every
# weight takes part in every iteration.
VERIFY_TOKENS = 8
VERIFY_ITERATIONS = 4
VERIFY_OVERRIDES = {"eval_max_iterations": VERIFY_ITERATIONS, "early_stop": False}


class VerificationError(RuntimeError):
    """The written folder, reloaded through remote code, does not reproduce the source logits."""


def verification_tokens(vocab_size: int) -> torch.Tensor:
    return (torch.arange(1, VERIFY_TOKENS + 1) * 7919 % vocab_size)[None]


@torch.no_grad()
def verification_logits(model: torch.nn.Module) -> torch.Tensor:
    """Logits of the fixed verification input, with the verification solver budget."""
    was_training = model.training
    model.eval()
    logits = model(
        verification_tokens(model.config.vocab_size), use_cache=False, solver_overrides=VERIFY_OVERRIDES
    ).logits
    model.train(was_training)
    return logits.float()


def empty_model(config: ImplicitPreTrainedConfig, dtype: torch.dtype) -> torch.nn.Module:
    """Our model for `config` with allocated but uninitialised weights (to be filled from a checkpoint)."""
    with no_init_weights():
        model = model_class(config)._from_config(config, dtype=dtype)
    model.tie_weights()  # skipped along with the initialisation
    return model


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors a checkpoint must provide (the tied LM head is the embedding)."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


@torch.no_grad()
def fill_model(model: torch.nn.Module, targets: list[str], produce: Callable[[str], torch.Tensor]) -> None:
    """Copy `produce(name)` into each parameter/buffer `name`, one tensor at a time (peak memory: the model plus one
    source tensor)."""
    state = model.state_dict()
    for name in tqdm(targets, desc="converting tensors", unit="tensor"):
        tensor = produce(name)
        state[name].copy_(tensor.to(state[name].dtype))


class RemoteCodeError(VerificationError):
    """A folder does not load, or does not run, through its own remote code in a fresh interpreter; `stderr` is the
    end of that interpreter's output (its traceback)."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


def reload_logits(folder: Path, dtype: str, workdir: Path) -> torch.Tensor:
    """Load `folder` with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` in a fresh interpreter
    that cannot import this repository (PYTHONPATH is emptied and it runs in `workdir`, so the folder's own remote
    code is what runs, with only torch and transformers) and return its verification logits (float32).

    `dtype` is a key of `DTYPES` or `"auto"` (the dtype the weights are stored in). Raises `RemoteCodeError` with the
    interpreter's traceback if loading or the forward pass fails."""
    output = workdir / "reloaded.pt"
    torch_dtype = repr("auto") if dtype == "auto" else f"torch.{dtype}"
    script = textwrap.dedent(
        f"""
        import warnings, torch
        from transformers import AutoModelForCausalLM
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True,
                                                     dtype={torch_dtype}).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        tokens = (torch.arange(1, {VERIFY_TOKENS} + 1) * 7919 % model.config.vocab_size)[None]
        with torch.no_grad():
            logits = model(tokens, use_cache=False, solver_overrides={VERIFY_OVERRIDES!r}).logits
        torch.save(logits.float(), {str(output)!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=workdir, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RemoteCodeError(
            f"Reloading {folder} with trust_remote_code failed:\n{result.stderr[-4000:]}", result.stderr[-20000:]
        )
    return torch.load(output, weights_only=True)


def _reload_logits(folder: Path, dtype: str, workdir: Path) -> torch.Tensor:
    # `export_model` reloads through this name: tests swap in an in-process reload here (conftest's verify_in_process)
    # without touching `reload_logits`, which `publish` uses.
    return reload_logits(folder, dtype, workdir)


def export_model(
    model: torch.nn.Module,
    destination: str | os.PathLike,
    *,
    dtype: str,
    card: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    generation_config: GenerationConfig | None = None,
    max_shard_size: str = "2GB",
    overwrite: bool = False,
    tolerance: float = 1e-4,
) -> float:
    """Write `model` (already in `dtype`) as a Hub repo folder at `destination` and verify it.

    The folder gets `config.json` with `auto_map`, sharded safetensors with their index, the remote-code files,
    `generation_config.json`, tokenizer files (when given) and `README.md` (`card`). It is written next to
    `destination` and renamed into place only after a fresh interpreter, loading it with
    `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, reproduced `model`'s logits to `tolerance`
    (max absolute difference). Returns that difference.

    Once written, `model`'s weights are released (moved to the meta device), so the reload never coexists with a
    second copy: peak memory stays near one model.
    """
    expected = verification_logits(model)
    with (atomic_output(destination, folder=True, overwrite=overwrite) as staging,
          tempfile.TemporaryDirectory() as workdir):
        if generation_config is not None:
            model.generation_config = generation_config
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        model.to("meta")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(card)
        reloaded = _reload_logits(staging, dtype, Path(workdir))
        if reloaded.shape != expected.shape:
            raise VerificationError(f"Reloaded logits have shape {tuple(reloaded.shape)}, expected {tuple(expected.shape)}")
        difference = (reloaded - expected).abs().max().item()
        logger.info("Verification: max |logit difference| after reload = %.3g", difference)
        if not difference <= tolerance:
            raise VerificationError(
                f"Reloaded model differs from the source: max |logit difference| {difference:.3g} > {tolerance:g}; "
                f"nothing was written to {destination}."
            )
    return difference


def load_tokenizer(name: str | None) -> PreTrainedTokenizerBase | None:
    """The tokenizer to ship with a repo (a folder or Hub id), or None; failures name the tokenizer."""
    if name is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as error:  # offline, missing files, unknown id
        raise ConversionError(f"Cannot load the tokenizer {name!r}: {error}") from error


def prepare_command(args: argparse.Namespace) -> None:
    """Before any work of a command that writes a model folder (`convert`, `import-pretrained`): refuse bad options
    (the dtype, the verification tolerance, a destination that is, contains or lies inside one of the inputs, which
    `--overwrite` would delete or the output would land in), then remove what killed runs left next to the
    destination (saying so), so that their disk space is free before the new output is written."""
    check_dtype(args.dtype)
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise ConversionError(f"--tolerance must be a finite number >= 0, got {args.tolerance}")
    try:
        check_apart(args.dst, {"--src": args.src, "--tokenizer": args.tokenizer})
    except ValueError as error:
        raise ConversionError(f"--dst: {error}") from error
    check_destination(args.dst, folder=True, overwrite=args.overwrite)
    remove_stale_partials(args.dst)


def run_command(work: Callable[[argparse.Namespace], float], args: argparse.Namespace) -> None:
    """Run a conversion command (which starts with `prepare_command`): any failure is reported as one `error:` line
    with exit status 1 (nothing is written then; see `export_model`)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        work(args)
    except SolverDivergenceError as error:
        logger.error("error: the model diverges on the verification input (%s); the checkpoint's weights or solver "
                     "settings are broken", error)
        raise SystemExit(1) from None
    except (ConversionError, FileExistsError, RuntimeError, ValueError) as error:
        logger.error("error: %s", error)
        raise SystemExit(1) from None


def check_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConversionError(f"--dtype {name!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[name]
