"""Training data: token files packed into fixed-length rows, served in a seeded order that a resumed run can replay.

Files: the order is a pure function of `(seed, micro-batch index)`: epoch `e` visits the rows in
`randperm(rows, seed + e)`, and micro-batch `m` of process `r` out of `P` is the next `batch_size` rows of that
endless stream starting at `(m * P + r) * batch_size`. A run therefore needs only the micro-batch counter to continue
exactly where it stopped, on any number of processes that matches the one it started with. Synthetic tasks
(`synthetic:S5`, `synthetic:A5`, `synthetic:mixed:P`) are generated per micro-batch from the same counter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from implicit_lm.cli import InputError
from implicit_lm.tokens import check_token_range, pack, read_tokens


class DataError(ValueError):
    """Training data that cannot be used (missing, empty, too short, outside the vocabulary)."""


def packed_rows(
    path: str | os.PathLike, tokenizer: Any, seq_len: int, vocab_size: int, text_field: str = "text"
) -> torch.Tensor:
    """The tokens of `path` (`.txt`, `.jsonl`, `.npy`, `.pt`; see `implicit_lm.tokens.read_tokens`) packed into
    `(rows, seq_len)`, the incomplete tail dropped."""
    try:
        tokens = read_tokens(path, tokenizer, text_field)
        check_token_range(tokens, vocab_size, str(path))
        return pack(tokens, seq_len, None, str(path))
    except InputError as error:
        raise DataError(str(error)) from error


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


SYNTHETIC_PREFIX = "synthetic:"
# Micro-batch seeds of the evaluation stream live far from the training stream's.
EVAL_SEED_OFFSET = 1_000_003


def parse_synthetic(spec: str) -> tuple[str, float | None]:
    """`synthetic:S5`, `synthetic:A5` or `synthetic:mixed:P` (the paper's D_p) -> (group, p)."""
    parts = spec.removeprefix(SYNTHETIC_PREFIX).split(":")
    if parts[0] in ("S5", "A5") and len(parts) == 1:
        return parts[0], None
    if parts[0] == "mixed" and len(parts) == 2:
        try:
            p = float(parts[1])
        except ValueError:
            p = -1.0
        if 0 <= p <= 1:
            return "mixed", p
    raise DataError(f"--data {spec}: expected synthetic:S5, synthetic:A5 or synthetic:mixed:P with P in [0, 1]")


class SyntheticStream:
    """Word problems (implicit_lm/tasks/word_problems.py) generated on the fly: micro-batch `m` of process `r` is drawn with seed
    `(seed, m, r)`, so the stream is endless, reproducible and resumable like `RowStream`. Batches are
    `(tokens, labels)`: the label at each position is the running product up to it (a per-position classification
    over the same ids, not next-token prediction)."""

    def __init__(self, spec: str, seq_len: int, batch_size: int, seed: int, vocab_size: int,
                 num_processes: int = 1, rank: int = 0):
        from implicit_lm.tasks.word_problems import get_monoid

        self.group, self.p = parse_synthetic(spec)
        size = get_monoid(self.group).size
        if size > vocab_size:
            raise DataError(f"--data {spec} has {size} symbols, more than the model's vocabulary ({vocab_size})")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.num_processes, self.rank = num_processes, rank

    def batch(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        from implicit_lm.tasks.word_problems import mixed_word_problem, word_problem

        seed = (self.seed * 1_000_000_007 + micro_step * self.num_processes + self.rank) % 2**63
        if self.group == "mixed":
            tokens, labels = mixed_word_problem(self.p, self.batch_size, self.seq_len, seed)
        else:
            tokens, labels = word_problem(self.group, self.batch_size, self.seq_len, seed)
        return tokens.long(), labels.long()

    def epoch_of(self, micro_step: int) -> float:
        """Fresh data every batch: samples drawn so far, in units of one batch per process."""
        return float(micro_step)


def data_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies the data for resume checks: a synthetic task's spec, or a file's resolved path and size."""
    if str(path).startswith(SYNTHETIC_PREFIX):
        return {"synthetic": str(path)}
    path = Path(path).resolve()
    return {"path": str(path), "bytes": path.stat().st_size}
