"""What every `python -m eval.<name>` command shares: loading a model with solver overrides, reading token data,
recording solver statistics, and writing JSON results and plots atomically."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

IMPLICIT_MODEL_TYPES = ("implicit_mamba2", "implicit_llama")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _boolean(value: str) -> bool:
    """`true`/`false` (also 1/0, yes/no) for a boolean config field."""
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


# Command-line flag -> config field of the solver settings a user may override at evaluation time.
SOLVER_FLAGS = {
    "eval_max_iterations": int,
    "tolerance": float,
    "inference_mode": str,
    "solver": str,
    "damping": float,
    "stop_mode": str,
    "stop_rule": str,
    "warm_start": _boolean,
    "convergence_check_interval": int,
    "cuda_graph_decoding": _boolean,
}


class EvalError(Exception):
    """A problem with the user's input (files, data, model, options): reported as one line, without a traceback."""


def run_cli(main: Callable[[list[str] | None], Any]) -> Callable[[list[str] | None], Any]:
    """Wrap a command's `main` so input errors print `error: ...` and exit with status 2."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            return main(argv)
        except EvalError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def add_model_arguments(
    parser: argparse.ArgumentParser, solver_flags: bool = True, model_required: bool = True
) -> None:
    """`--model`, `--dtype`, `--device` and (for implicit models) the solver overrides."""
    parser.add_argument(
        "--model", required=model_required, help="Hub-layout folder (or Hub id) loadable with trust_remote_code"
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if solver_flags:
        group = parser.add_argument_group("solver overrides (implicit models only; default: the model's config)")
        for name, kind in SOLVER_FLAGS.items():
            group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None)


def solver_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The solver flags the user set, as config field overrides."""
    return {name: getattr(args, name) for name in SOLVER_FLAGS if getattr(args, name, None) is not None}


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
        raise EvalError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if os.path.sep in name or name.startswith("."):
        if not Path(name).is_dir():
            raise EvalError(f"Model folder {name} does not exist")
        if not (Path(name) / "config.json").is_file():
            raise EvalError(f"{name} has no config.json: not a Hub-layout model folder")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=True)
    except Exception as error:  # missing, offline, unknown model type
        raise EvalError(f"Cannot load the config of {name!r}: {error}") from error
    if overrides and config.model_type not in IMPLICIT_MODEL_TYPES:
        raise EvalError(
            f"{name} is a {config.model_type!r} model, not an implicit one: the solver options "
            f"{sorted(overrides)} do not apply to it"
        )
    try:
        for field, value in overrides.items():
            setattr(config, field, value)
        if hasattr(config, "validate"):
            config.validate()
    except ValueError as error:
        raise EvalError(str(error)) from error
    try:
        model = AutoModelForCausalLM.from_pretrained(name, config=config, trust_remote_code=True, dtype=DTYPES[dtype])
    except Exception as error:
        raise EvalError(f"Cannot load the model {name!r}: {error}") from error
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


def read_tokens(path: str | os.PathLike, tokenizer: Any, text_field: str = "text") -> torch.Tensor:
    """All tokens of a data file as one 1-D int64 tensor.

    `.txt`: the whole text, tokenized; `.jsonl`: one document per line (field `text_field`), tokenized and joined
    with the tokenizer's EOS token when it has one; `.npy` / `.pt`: token ids, any shape (flattened).
    """
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"Data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".pt"):
        if suffix == ".npy":
            import numpy as np

            tokens = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            tokens = torch.load(path, weights_only=True)
            if not isinstance(tokens, torch.Tensor):
                raise EvalError(f"{path} holds a {type(tokens).__name__}, expected a tensor of token ids")
        if tokens.is_floating_point() or tokens.is_complex():
            raise EvalError(f"{path} holds {tokens.dtype} values, expected integer token ids")
        tokens = tokens.flatten().long()
    elif suffix in (".txt", ".jsonl"):
        if tokenizer is None:
            raise EvalError(f"{path} is text but the model has no tokenizer; pass token ids as .npy or .pt")
        if suffix == ".txt":
            documents = [path.read_text(encoding="utf-8")]
        else:
            documents = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise EvalError(f"{path}:{number} is not valid JSON: {error}") from error
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise EvalError(f"{path}:{number} has no string field {text_field!r}")
                documents.append(record[text_field])
        ids: list[int] = []
        for document in documents:
            ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
            if suffix == ".jsonl" and tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        tokens = torch.tensor(ids, dtype=torch.long)
    else:
        raise EvalError(f"{path}: unknown data format {suffix!r}; use .txt, .jsonl, .npy or .pt")
    if tokens.numel() == 0:
        raise EvalError(f"{path} contains no tokens")
    return tokens


WORD_PREFIX = "\u2581"  # the mark of a word's leading space in a word-level tokenizer's vocabulary


def word_level_tokenizer(words: list[str], special_tokens: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """A transformers fast tokenizer with one token per word (`words[i]` has id `i`; text is split on whitespace).

    Every word decodes with its leading space, as a GPT-2 continuation token does: `decode` of any ids is
    `" w1 w2 ..."`, so `pipeline("text-generation")`'s prompt + generated text reads `"... w1 w2"` instead of gluing
    the first generated word to the prompt's last. `special_tokens` (`{"pad_token": "<pad>", ...}`, each among
    `words`) match as written and decode without a space; with an `unk_token` unknown words map to it, without one
    they are an error.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special_tokens = special_tokens or {}
    specials = set(special_tokens.values())
    vocabulary = {(word if word in specials else WORD_PREFIX + word): index for index, word in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token=special_tokens.get("unk_token")))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=WORD_PREFIX, prepend_scheme="always", split=False),
    ])
    tokenizer.decoder = decoders.Metaspace(replacement=WORD_PREFIX, prepend_scheme="never")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **special_tokens, **kwargs
    )


def add_data_arguments(parser: argparse.ArgumentParser, seq_len: int) -> None:
    """`--data`, `--text-field`, `--seq-len`, `--max-sequences`, `--batch-size` (see `load_rows`)."""
    parser.add_argument("--data", required=True, help=".txt, .jsonl (field --text-field), .npy or .pt token ids")
    parser.add_argument("--text-field", default="text", help="the text field of .jsonl records (default: text)")
    parser.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per packed row (default {seq_len})")
    parser.add_argument("--max-sequences", type=int, help="evaluate at most this many rows")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per forward (default 1)")


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Reject zero or negative values of integer options (None means unset)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")


def load_rows(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    """The data of `add_data_arguments`, tokenized, range-checked and packed into `(rows, seq_len)`."""
    tokens = read_tokens(args.data, tokenizer, args.text_field)
    check_token_range(tokens, model.config.vocab_size, args.data)
    return pack(tokens, args.seq_len, args.max_sequences, args.data)


def check_token_range(tokens: torch.Tensor, vocab_size: int, source: str) -> None:
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise EvalError(f"{source} has token ids in [{low}, {high}], outside the model's vocabulary [0, {vocab_size})")


def pack(tokens: torch.Tensor, seq_len: int, max_sequences: int | None, source: str) -> torch.Tensor:
    """Cut `tokens` into `(num_sequences, seq_len)` rows, dropping the incomplete tail."""
    if seq_len < 2:
        raise EvalError(f"--seq-len {seq_len}: needs at least 2 tokens per sequence")
    if tokens.numel() < seq_len:
        raise EvalError(f"{source} has {tokens.numel()} tokens, fewer than one sequence of --seq-len {seq_len}")
    rows = tokens.numel() // seq_len
    if max_sequences is not None:
        rows = min(rows, max_sequences)
    return tokens[: rows * seq_len].view(rows, seq_len)


class SolverStatsRecorder:
    """Collects `solver_stats` from every forward of a model (a forward hook), so evaluation code that only sees
    logits (lm-eval, generate) still reports iterations and residuals.

    Simultaneous-mode forwards give one value per sequence, sequential-mode forwards one per token; `summary()`
    reports them separately."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.per_sequence: list[dict[str, torch.Tensor]] = []
        self.per_token: list[dict[str, torch.Tensor]] = []
        self._handle = None

    def _hook(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        stats = getattr(output, "solver_stats", None)
        if stats is None:
            return
        record = {
            "iterations": stats.iterations.detach().flatten().cpu(),
            "residual": stats.residual.detach().float().flatten().cpu(),
            "converged": stats.converged.detach().flatten().cpu(),
        }
        (self.per_token if stats.iterations.dim() == 2 else self.per_sequence).append(record)

    def __enter__(self) -> SolverStatsRecorder:
        self._handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def summary(self) -> dict[str, Any]:
        return {
            "per_sequence": summarize_stats(self.per_sequence),
            "per_token": summarize_stats(self.per_token),
        }


PERCENTILES = (50, 90, 99)


def summarize_stats(records: list[dict[str, torch.Tensor]]) -> dict[str, Any] | None:
    """Mean, percentiles and maximum of iterations; mean and maximum final residual; converged fraction."""
    if not records:
        return None
    iterations = torch.cat([r["iterations"] for r in records]).double()
    residual = torch.cat([r["residual"] for r in records]).double()
    converged = torch.cat([r["converged"] for r in records])
    quantiles = torch.quantile(iterations, torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64))
    return {
        "count": int(iterations.numel()),
        "iterations_mean": iterations.mean().item(),
        **{f"iterations_p{p}": q.item() for p, q in zip(PERCENTILES, quantiles)},
        "iterations_max": int(iterations.max().item()),
        "residual_mean": residual.mean().item(),
        "residual_max": residual.max().item(),
        "converged_fraction": converged.float().mean().item(),
    }


def _command_line() -> str:
    """The command as typed: `python -m eval.<name> ...` for the eval commands."""
    if not sys.argv:
        return ""
    program = Path(sys.argv[0])
    head = f"python -m eval.{program.stem}" if program.parent.name == "eval" else program.name
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


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write `payload` as indented JSON; the file appears complete or not at all. NaN/inf are rejected."""
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda temporary: temporary.write_text(text))
    logger.info("Wrote %s", path)


def save_figure(figure: Any, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(Path(path), lambda temp: figure.savefig(temp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(figure)
    logger.info("Wrote %s", path)


def new_figure(columns: int = 1, width: float = 6.0, height: float = 4.0) -> tuple[Any, Any]:
    """A headless matplotlib figure (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width * columns, height), squeeze=False)
