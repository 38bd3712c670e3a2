"""Token data from files: reading `.txt`, `.jsonl`, `.npy`, `.pt` and saved 🤗 datasets folders into token ids, range
checks and packing into rows, for evaluation and training alike."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from implicit_lm.cli import InputError


def saved_dataset(path: Path, split: str) -> Any:
    """The dataset saved with `save_to_disk` in the folder `path` (split `split` of a `DatasetDict`)."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as error:
        raise InputError(f"{path} is a folder: reading a saved dataset needs `datasets` (pip install datasets)") from error
    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError as error:
        raise InputError(f"{path} is a folder but not a dataset saved with save_to_disk: {error}") from error
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise InputError(f"{path} has no split {split!r}; it has {', '.join(dataset)}")
        dataset = dataset[split]
    return dataset


def dataset_documents(path: Path, split: str, text_field: str) -> list[str]:
    """The `text_field` column of a saved dataset folder (`saved_dataset`), e.g. the corpus of `implicit-lm corpus`."""
    dataset = saved_dataset(path, split)
    if text_field not in dataset.column_names:
        raise InputError(f"{path} has no column {text_field!r}; it has {', '.join(dataset.column_names)}")
    return list(dataset[text_field])


def text_documents(path: str | os.PathLike, text_field: str = "text", split: str = "train") -> list[str]:
    """The documents of a text source: a `.txt` file (one document), a `.jsonl` file (one per line, field
    `text_field`) or a saved dataset folder (one per record of split `split`)."""
    path = Path(path)
    if path.is_dir():
        return dataset_documents(path, split, text_field)
    if not path.is_file():
        raise InputError(f"Data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if suffix != ".jsonl":
        raise InputError(f"{path}: not a text source ({suffix!r}); use .txt, .jsonl or a saved dataset folder")
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
    return documents


def read_tokens(path: str | os.PathLike, tokenizer: Any, text_field: str = "text", split: str = "train"
                ) -> torch.Tensor:
    """All tokens of a data file as one 1-D int64 tensor.

    `.txt`: the whole text, tokenized; `.jsonl`: one document per line (field `text_field`), tokenized and joined
    with the tokenizer's EOS token when it has one; a folder: a saved 🤗 dataset (split `split` of a DatasetDict),
    one document per record, joined the same way; `.npy` / `.pt`: token ids, any shape (flattened).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".txt", ".jsonl"):
        documents = text_documents(path, text_field, split)
        if tokenizer is None:
            raise InputError(f"{path} is text but the model has no tokenizer; pass token ids as .npy or .pt")
        if suffix == ".txt":
            tokens = torch.tensor(tokenizer(documents[0], add_special_tokens=False)["input_ids"], dtype=torch.long)
        else:
            return _join_documents(documents, tokenizer, str(path))
    elif not path.is_file():
        raise InputError(f"Data file {path} does not exist")
    elif suffix in (".npy", ".pt"):
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
    else:
        raise InputError(f"{path}: unknown data format {suffix!r}; use .txt, .jsonl, .npy, .pt or a dataset folder")
    if tokens.numel() == 0:
        raise InputError(f"{path} contains no tokens")
    return tokens


def document_rows(path: str | os.PathLike, tokenizer: Any, seq_len: int, max_sequences: int | None,
                  text_field: str = "text", split: str = "train") -> torch.Tensor:
    """One row per document at least `seq_len` tokens long: its first `seq_len` tokens, `(rows, seq_len)`. Unlike
    packed rows, every position counts from the start of its document: what length extrapolation measures."""
    if tokenizer is None:
        raise InputError(f"{path}: document rows need the model's tokenizer")
    documents = text_documents(path, text_field, split)
    rows = [ids[:seq_len] for ids in tokenizer(documents, add_special_tokens=False)["input_ids"] if len(ids) >= seq_len]
    if not rows:
        raise InputError(f"{path} has no document of at least {seq_len} tokens (it has {len(documents)} documents)")
    return torch.tensor(rows[:max_sequences] if max_sequences else rows, dtype=torch.long)


def _join_documents(documents: list[str], tokenizer: Any, source: str) -> torch.Tensor:
    """The documents' tokens, each followed by the tokenizer's EOS token when it has one."""
    ids: list[int] = []
    for document_ids in tokenizer(documents, add_special_tokens=False)["input_ids"] if documents else []:
        ids.extend(document_ids)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    if not ids:
        raise InputError(f"{source} contains no tokens")
    return torch.tensor(ids, dtype=torch.long)


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
