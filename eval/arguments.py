"""The options the evaluation commands share: the model and its solver overrides, and the token data."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from implicit_lm.models import DTYPES
from implicit_lm.tokens import check_token_range, document_rows, pack, read_tokens


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
    "inference_loop": str,
    "warm_start": _boolean,
    "convergence_check_interval": int,
    "cuda_graph_decoding": _boolean,
    "compile_decoding": _boolean,
    "compile_simultaneous": _boolean,
}


# Old spellings of solver flags, still accepted.
FLAG_ALIASES = {"inference_loop": ("--stop-rule",)}


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
            group.add_argument(f"--{name.replace('_', '-')}", *FLAG_ALIASES.get(name, ()), dest=name, type=kind,
                               default=None)


def solver_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The solver flags the user set, as config field overrides."""
    return {name: getattr(args, name) for name in SOLVER_FLAGS if getattr(args, name, None) is not None}


def add_data_arguments(parser: argparse.ArgumentParser, seq_len: int) -> None:
    """`--data`, `--split`, `--text-field`, `--seq-len`, `--max-sequences`, `--document-rows`, `--batch-size` (see
    `load_rows`)."""
    parser.add_argument("--data", required=True,
                        help=".txt, .jsonl (field --text-field), .npy or .pt token ids, or a saved 🤗 dataset folder")
    parser.add_argument("--split", default="validation", help="split of a dataset folder --data (default validation)")
    parser.add_argument("--text-field", default="text", help="the text field of .jsonl records (default: text)")
    parser.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per packed row (default {seq_len})")
    parser.add_argument("--max-sequences", type=int, help="evaluate at most this many rows")
    parser.add_argument("--document-rows", action="store_true",
                        help="one row per document of at least --seq-len tokens (its start), instead of packing "
                             "documents together: every position counts from its document's start")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per forward (default 1)")


def load_rows(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    """The data of `add_data_arguments`, tokenized, range-checked and packed into `(rows, seq_len)` (or one row per
    long enough document, `--document-rows`)."""
    if getattr(args, "document_rows", False):
        rows = document_rows(args.data, tokenizer, args.seq_len, args.max_sequences, args.text_field, args.split)
        check_token_range(rows, model.config.vocab_size, args.data)
        return rows
    tokens = read_tokens(args.data, tokenizer, args.text_field, args.split)
    check_token_range(tokens, model.config.vocab_size, args.data)
    return pack(tokens, args.seq_len, args.max_sequences, args.data)
