"""Running several `training.finetune` jobs of an experiment side by side on one machine.

Each job is a subprocess with its own log file and its share of the CPU threads (tiny models on a few cores are
20-50x slower when several processes each start one thread per core). A job whose result folder exists is skipped,
so an interrupted experiment continues where it stopped; the time each job took is kept beside its log.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from implicit_lm.models import intra_op_threads

T = TypeVar("T")
R = TypeVar("R")


class JobError(RuntimeError):
    """A training subprocess failed; the message names its log."""


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def all_threads() -> contextlib.AbstractContextManager[None]:
    """Every core for this process's own work (the evaluation after the jobs), or `OMP_NUM_THREADS` where the caller
    set it (runs sharing the machine), restoring the thread count after."""
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return intra_op_threads(int(limit) if limit.isdigit() and int(limit) > 0 else threads_per_job(1))


def finetune_command(*arguments: str) -> list[str]:
    """`python -m implicit_lm.training.finetune ARGUMENTS` with this interpreter (`implicit-lm finetune`)."""
    return [sys.executable, "-m", "implicit_lm.training.finetune", *arguments]


def run_logged(command: Sequence[str], log_path: Path, threads: int, done: Path | None = None) -> float | None:
    """Run `command` with stdout and stderr in `log_path` and `threads` intra-op threads, and return the seconds it
    took (also recorded in `<log_path>.seconds.json`). When `done` exists the job is not run again: the seconds
    recorded when it ran are returned (None if there is no record). Raises `JobError` when it fails."""
    record = log_path.with_name(log_path.name + ".seconds.json")
    if done is not None and done.exists():
        return json.loads(record.read_text())["seconds"] if record.is_file() else None
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run(list(command), stdout=log, stderr=subprocess.STDOUT, env=environment)
    if result.returncode != 0:
        raise JobError(f"{' '.join(command[:4])} ... failed (exit {result.returncode}); see {log_path}")
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"seconds": seconds, "threads": threads}) + "\n")
    return seconds


def run_parallel(function: Callable[[T], R], items: Sequence[T], jobs: int, desc: str) -> list[R]:
    """`function` over `items`, `jobs` at a time (threads that wait on subprocesses), with a progress bar; results in
    the order of `items`. After a failure no further item starts, and the error is raised."""
    results: dict[int, Any] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(function, item): index for index, item in enumerate(items)}
        try:
            for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc=desc, unit="job"):
                results[futures[future]] = future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return [results[index] for index in range(len(items))]
