"""Token data from files: reading `.txt`, `.jsonl`, `.npy` and `.pt` into token ids, range checks and packing into
rows, for evaluation and training alike."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from implicit_lm.cli import InputError


def read_tokens(path: str | os.PathLike, tokenizer: Any, text_field: str = "text") -> torch.Tensor:
    """All tokens of a data file as one 1-D int64 tensor.

    `.txt`: the whole text, tokenized; `.jsonl`: one document per line (field `text_field`), tokenized and joined
    with the tokenizer's EOS token when it has one; `.npy` / `.pt`: token ids, any shape (flattened).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".pt"):
        if suffix == ".npy":
            import numpy as np

            tokens = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            tokens = torch.load(path, weights_only=True)
            if not isinstance(tokens, torch.Tensor):
                raise InputError(f"{path} holds a {type(tokens).__name__}, expected a tensor of token ids")
        if tokens.is_floating_point() or tokens.is_complex():
            raise InputError(f"{path} holds {tokens.dtype} values, expected integer token ids")
        tokens = tokens.flatten().long()
    elif suffix in (".txt", ".jsonl"):
        if tokenizer is None:
            raise InputError(f"{path} is text but the model has no tokenizer; pass token ids as .npy or .pt")
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
                    raise InputError(f"{path}:{number} is not valid JSON: {error}") from error
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise InputError(f"{path}:{number} has no string field {text_field!r}")
                documents.append(record[text_field])
        ids: list[int] = []
        for document in documents:
            ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
            if suffix == ".jsonl" and tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        tokens = torch.tensor(ids, dtype=torch.long)
    else:
        raise InputError(f"{path}: unknown data format {suffix!r}; use .txt, .jsonl, .npy or .pt")
    if tokens.numel() == 0:
        raise InputError(f"{path} contains no tokens")
    return tokens


def check_token_range(tokens: torch.Tensor, vocab_size: int, source: str) -> None:
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise InputError(f"{source} has token ids in [{low}, {high}], outside the model's vocabulary [0, {vocab_size})")


def pack(tokens: torch.Tensor, seq_len: int, max_sequences: int | None, source: str) -> torch.Tensor:
    """Cut `tokens` into `(num_sequences, seq_len)` rows, dropping the incomplete tail."""
    if seq_len < 2:
        raise InputError(f"--seq-len {seq_len}: needs at least 2 tokens per sequence")
    if tokens.numel() < seq_len:
        raise InputError(f"{source} has {tokens.numel()} tokens, fewer than one sequence of --seq-len {seq_len}")
    rows = tokens.numel() // seq_len
    if max_sequences is not None:
        rows = min(rows, max_sequences)
    return tokens[: rows * seq_len].view(rows, seq_len)
