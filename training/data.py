"""Training data: token files packed into fixed-length rows, served in a seeded order that a resumed run can replay.

Files in memory (`RowStream`): the order is a pure function of `(seed, micro-batch index)`: epoch `e` visits the rows
in `randperm(rows, seed + e)`, and micro-batch `m` of process `r` out of `P` is the next `batch_size` rows of that
endless stream starting at `(m * P + r) * batch_size`. A run therefore needs only the micro-batch counter to continue
exactly where it stopped, on any number of processes that matches the one it started with. Synthetic tasks
(`synthetic:S5`, `synthetic:A5`, `synthetic:mixed:P`) are generated per micro-batch from the same counter.

Corpora too large for memory (`TextStream`, `finetune --streaming`): 🤗 `datasets` reads the documents lazily
(`streaming=True`; a saved dataset folder, data files or a folder of shards), epoch `e` visits them in the order of `IterableDataset.shuffle(seed, buffer)` at epoch `e`, and
they are tokenized as they come, joined with EOS and cut into rows: the same endless row stream and the same
micro-batch rule as `RowStream`, so the order does not depend on the number of processes. Its position (epoch,
documents read, tokens of the current document used) is small and saved with every checkpoint; a resumed run skips
the documents already read without tokenizing them and continues bitwise where it stopped.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from implicit_lm.cli import InputError
from implicit_lm.tokens import check_token_range, pack, read_tokens, saved_dataset


class DataError(ValueError):
    """Training data that cannot be used (missing, empty, too short, outside the vocabulary)."""


def packed_rows(
    path: str | os.PathLike, tokenizer: Any, seq_len: int, vocab_size: int, text_field: str = "text",
    split: str = "train",
) -> torch.Tensor:
    """The tokens of `path` (`.txt`, `.jsonl`, `.npy`, `.pt` or a saved dataset folder and its `split`; see
    `implicit_lm.tokens.read_tokens`) packed into `(rows, seq_len)`, the incomplete tail dropped."""
    try:
        tokens = read_tokens(path, tokenizer, text_field, split)
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


# `load_dataset` builders for the files `TextStream` streams, by suffix (before a compression suffix).
STREAMING_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}
COMPRESSION_SUFFIXES = (".gz", ".zst", ".bz2", ".xz")


def _builder(path: Path) -> str | None:
    name = path.name.lower()
    for compression in COMPRESSION_SUFFIXES:
        name = name.removesuffix(compression)
    return STREAMING_BUILDERS.get(Path(name).suffix)


def streaming_documents(path: str | os.PathLike, split: str, text_field: str) -> Any:
    """`path` as a 🤗 `IterableDataset` of documents, read lazily: a dataset saved with `save_to_disk` (split `split`
    of a DatasetDict), or a `.jsonl`/`.json`/`.parquet`/`.arrow` file (a record per document, text in
    `text_field`) or `.txt` file (the whole file one document), possibly compressed (`.gz`, `.zst`, ...), or a folder
    of such files of one kind (the Pile's shards), read in name order."""
    try:
        import datasets
    except ImportError as error:
        raise DataError("--streaming needs 🤗 datasets (pip install datasets)") from error
    path = Path(path)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            documents = saved_dataset(path, split).to_iterable_dataset()
        except InputError as error:
            raise DataError(str(error)) from error
    else:
        if path.is_dir():
            files = sorted(item for item in path.iterdir() if item.is_file() and _builder(item))
            if not files:
                raise DataError(f"{path} is neither a saved dataset nor a folder of data files "
                                f"({', '.join(STREAMING_BUILDERS)})")
        elif path.is_file():
            files = [path]
        else:
            raise DataError(f"Data file {path} does not exist")
        builders = {_builder(item) for item in files}
        if None in builders:
            raise DataError(f"{path}: --streaming reads {', '.join(STREAMING_BUILDERS)} files (compressed or not), a "
                            "folder of them or a saved dataset folder")
        if len(builders) > 1:
            raise DataError(f"{path} mixes data files of several kinds ({', '.join(sorted(builders))})")
        builder = builders.pop()
        options = {"sample_by": "document"} if builder == "text" else {}
        documents = datasets.load_dataset(builder, data_files=[str(item) for item in files], split="train",
                                          streaming=True, **options)
    columns = documents.column_names
    if columns is not None and text_field not in columns:
        raise DataError(f"{path} has no field {text_field!r}; it has {', '.join(columns)}")
    return documents


class TextStream:
    """Micro-batches of rows packed from documents read and tokenized lazily (see the module docstring); the same
    `batch(micro_step)` interface as `RowStream`, plus `position()` / `seek()` for checkpoints.

    `documents` is an `IterableDataset` (`streaming_documents`); each epoch reads it shuffled with a buffer of
    `shuffle_buffer` documents (0: in order). A run reads its batches in increasing order; asking for an earlier one
    reads the stream again from the start."""

    def __init__(self, documents: Any, tokenizer: Any, seq_len: int, batch_size: int, seed: int, vocab_size: int,
                 text_field: str = "text", shuffle_buffer: int = 10_000, num_processes: int = 1, rank: int = 0,
                 source: str = "data"):
        if tokenizer is None:
            raise DataError(f"{source} is text but the model has no tokenizer")
        if seq_len < 2:
            raise DataError(f"--seq-len {seq_len}: needs at least 2 tokens per row")
        self.documents, self.tokenizer, self.text_field, self.source = documents, tokenizer, text_field, source
        self.seq_len, self.batch_size, self.seed, self.vocab_size = seq_len, batch_size, seed, vocab_size
        self.shuffle_buffer, self.num_processes, self.rank = shuffle_buffer, num_processes, rank
        self._restart({"row": 0, "epoch": 0, "documents": 0, "offset": 0})

    def _epoch_documents(self, epoch: int) -> Iterator[dict[str, Any]]:
        if not self.shuffle_buffer:
            return iter(self.documents)
        shuffled = self.documents.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        shuffled.set_epoch(epoch)
        return iter(shuffled)

    def _restart(self, position: dict[str, int]) -> None:
        """Continue from `position` (see `position()`): skip its epoch's first documents without tokenizing them."""
        self._row, self._epoch = position["row"], position["epoch"]
        self._documents_read = position["documents"]
        # Tokens read in this epoch (enough for a row when resuming inside one): an epoch with fewer than a row's
        # tokens would loop forever.
        self._epoch_tokens = self.seq_len if position["documents"] or position["offset"] else 0
        self._iterator = itertools.islice(self._epoch_documents(self._epoch), position["documents"], None)
        self._buffer: list[int] = []  # the tokens of the document being cut into rows
        self._offset = 0  # how many of them earlier rows hold
        if position["offset"]:
            self._read_document()
            self._offset = position["offset"]

    def _read_document(self) -> bool:
        """Append the next document's tokens (and EOS) to the buffer; False at the end of the epoch."""
        record = next(self._iterator, None)
        if record is None:
            return False
        text = record.get(self.text_field)
        if not isinstance(text, str):
            raise DataError(f"{self.source}: a document has no string field {self.text_field!r}")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise DataError(f"{self.source} has token ids outside the model's vocabulary [0, {self.vocab_size})")
        self._documents_read += 1
        self._epoch_tokens += len(ids)
        self._buffer, self._offset = ids, 0
        return True

    def _next_row(self) -> list[int]:
        row: list[int] = []
        while len(row) < self.seq_len:
            if self._offset == len(self._buffer) and not self._read_document():
                # The epoch's incomplete last row is dropped; the next epoch starts a fresh row.
                if self._epoch_tokens < self.seq_len:
                    raise DataError(f"{self.source} holds {self._epoch_tokens} tokens, fewer than one row of "
                                    f"--seq-len {self.seq_len}")
                self._epoch, self._documents_read, self._epoch_tokens = self._epoch + 1, 0, 0
                self._iterator, row = self._epoch_documents(self._epoch), []
                continue
            taken = self._buffer[self._offset:self._offset + self.seq_len - len(row)]
            row.extend(taken)
            self._offset += len(taken)
        self._row += 1
        return row

    def position(self) -> dict[str, int]:
        """Where the stream stands, as JSON-able integers: the global row index next read, its epoch, the documents
        of that epoch read so far, and how many tokens of the last one rows already hold (0: none pending)."""
        pending = self._offset if self._offset < len(self._buffer) else 0
        return {"row": self._row, "epoch": self._epoch,
                "documents": self._documents_read - (1 if pending else 0), "offset": pending}

    def seek(self, position: dict[str, int]) -> None:
        self._restart(position)

    def rows_before(self, micro_step: int) -> int:
        return micro_step * self.num_processes * self.batch_size

    def batch(self, micro_step: int) -> torch.Tensor:
        """This process's rows for micro-batch `micro_step` (0-based, counted over the whole run)."""
        first = self.rows_before(micro_step)
        if first < self._row:
            self._restart({"row": 0, "epoch": 0, "documents": 0, "offset": 0})
        while self._row < first:
            self._next_row()
        rows = [self._next_row() for _ in range(self.num_processes * self.batch_size)]
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return torch.tensor(mine, dtype=torch.long)

    def epoch_of(self, micro_step: int) -> float:
        """Passes over the data completed (whole epochs: a stream's length is known only once it has been read)."""
        return float(self._epoch)


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
    """What identifies the data for resume checks: a synthetic task's spec, or a file's (or a dataset folder's)
    resolved path and size in bytes."""
    if str(path).startswith(SYNTHETIC_PREFIX):
        return {"synthetic": str(path)}
    path = Path(path).resolve()
    if path.is_dir():
        return {"path": str(path), "bytes": sum(item.stat().st_size for item in path.rglob("*") if item.is_file())}
    return {"path": str(path), "bytes": path.stat().st_size}
