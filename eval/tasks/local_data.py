"""Loader of the local tasks' data (`custom_dataset: !function local_data.load` in their YAMLs).

lm-eval would pass `dataset_kwargs.data_files` to `datasets.load_dataset`, which resolves relative paths against the
current directory. lm-eval resolves `!function` against the YAML's own folder, so loading through this module finds
`data/` next to it from any directory, installed or not, without network and without the datasets cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"


def load(data_file: str, **metadata: Any) -> datasets.DatasetDict:
    """The records of `data/<data_file>` (JSON lines) as the `test` split. `metadata` (the task's and the task
    manager's, which lm-eval passes to every custom dataset) is not needed."""
    lines = (DATA_DIR / data_file).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})
