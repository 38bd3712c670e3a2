"""Training data: token files packed into fixed-length rows, served in a seeded order that a resumed run can replay.

The order is a pure function of `(seed, micro-batch index)`: epoch `e` visits the rows in `randperm(rows, seed + e)`,
and micro-batch `m` of process `r` out of `P` is the next `batch_size` rows of that endless stream starting at
`(m * P + r) * batch_size`. A run therefore needs only the micro-batch counter to continue exactly where it stopped,
on any number of processes that matches the one it started with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from eval.common import EvalError, check_token_range, read_tokens


class DataError(ValueError):
    """Training data that cannot be used (missing, empty, too short, outside the vocabulary)."""


def packed_rows(
    path: str | os.PathLike, tokenizer: Any, seq_len: int, vocab_size: int, text_field: str = "text"
) -> torch.Tensor:
    """The tokens of `path` (`.txt`, `.jsonl`, `.npy`, `.pt`; see `eval.common.read_tokens`) packed into
    `(rows, seq_len)`, the incomplete tail dropped."""
    try:
        tokens = read_tokens(path, tokenizer, text_field)
        check_token_range(tokens, vocab_size, str(path))
    except EvalError as error:
        raise DataError(str(error)) from error
    if tokens.numel() < seq_len:
        raise DataError(f"{path} has {tokens.numel()} tokens, fewer than one row of --seq-len {seq_len}")
    rows = tokens.numel() // seq_len
    return tokens[: rows * seq_len].view(rows, seq_len)


class RowStream:
    """Micro-batches of packed rows in a reproducible, resumable order (see the module docstring)."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int, num_processes: int = 1, rank: int = 0):
        if rows.shape[0] < batch_size * num_processes:
            raise DataError(
                f"the data has {rows.shape[0]} rows of {rows.shape[1]} tokens, fewer than one batch "
                f"({batch_size} rows x {num_processes} processes)"
            )
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.num_processes = num_processes
        self.rank = rank
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.rows.shape[0], generator=generator)
        return self._order

    def batch(self, micro_step: int) -> torch.Tensor:
        """This process's rows for micro-batch `micro_step` (0-based, counted over the whole run)."""
        start = (micro_step * self.num_processes + self.rank) * self.batch_size
        indices = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.rows.shape[0])
            indices.append(self._permutation(epoch)[offset])
        return self.rows[torch.stack(indices)]

    def epoch_of(self, micro_step: int) -> float:
        """Passes over the data completed before micro-batch `micro_step` (all processes together)."""
        return micro_step * self.num_processes * self.batch_size / self.rows.shape[0]


def data_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a data file for resume checks: its resolved path and size."""
    path = Path(path).resolve()
    return {"path": str(path), "bytes": path.stat().st_size}
