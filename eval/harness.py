"""Run lm-eval tasks on a model and report the solver statistics of each task next to its metrics.

    implicit-lm eval harness --model PATH --tasks paper --batch-size 16 --output harness.json
    implicit-lm eval harness --model PATH --tasks local --limit 8 --eval-max-iterations 24

`--tasks` takes lm-eval task, group or tag names, `paper` (the seven zero-shot tasks of the paper) and `local` (the
offline tasks shipped in `eval/tasks/`, one per request type). The model is loaded once with `trust_remote_code` and
the solver overrides applied to its config, wrapped in lm-eval's `HFLM`, and each requested task runs in its own
`simple_evaluate` call so that its solver statistics are its own. Any transformers causal LM runs as a baseline
(without solver overrides or statistics).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import logging
import math
from pathlib import Path
from typing import Any

from implicit_lm.eval.arguments import add_model_arguments, solver_overrides
from implicit_lm.eval.stats import SolverStatsRecorder

from implicit_lm.cli import InputError, run_cli
from implicit_lm.files import write_json
from implicit_lm.models import is_implicit, load_model
from implicit_lm.provenance import run_metadata

logger = logging.getLogger(__name__)

# The zero-shot tasks of the paper's downstream evaluation.
PAPER_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa")
LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASKS = ("implicit_local_choice", "implicit_local_lastword", "implicit_local_text", "implicit_local_continue")
TASK_ALIASES = {"paper": PAPER_TASKS, "local": LOCAL_TASKS}


def padding_aware_lm(hflm: type) -> type:
    """lm-eval's `HFLM` (`hflm`) telling the model which positions of its right-padded log-likelihood batches are
    padding. `HFLM` pads a batch's rows to the longest without an attention mask; a causal transformer's logits do
    not see right padding, but an implicit model's solve of a row does (its convergence test covers the padding),
    so scores would depend on the batch size. Given the mask, padding is held at zero and never enters a test.

    lm-eval builds the batch with `pad_and_concat` in `lm_eval.models.huggingface` and keeps the row lengths to
    itself: the subclass records them by wrapping that function for the duration of a log-likelihood call (lm-eval
    0.4.x; with an lm-eval without it, the plain `HFLM` behaviour, and a warning)."""
    import lm_eval.models.huggingface as huggingface
    import torch

    class PaddingAwareHFLM(hflm):
        _row_lengths: list[int] | None = None

        def _loglikelihood_tokens(self, *args: Any, **kwargs: Any) -> Any:
            pad_and_concat = getattr(huggingface, "pad_and_concat", None)
            if pad_and_concat is None:
                logger.warning("lm-eval has no pad_and_concat: padded rows enter the implicit solve; scores may "
                               "depend on --batch-size")
                return super()._loglikelihood_tokens(*args, **kwargs)

            def recording(max_length: int, tensors: list, *rest: Any, **options: Any) -> Any:
                self._row_lengths = [tensor.shape[0] for tensor in tensors]
                return pad_and_concat(max_length, tensors, *rest, **options)

            huggingface.pad_and_concat = recording
            try:
                return super()._loglikelihood_tokens(*args, **kwargs)
            finally:
                huggingface.pad_and_concat = pad_and_concat
                self._row_lengths = None

        def _model_call(self, inps: Any, attn_mask: Any = None, labels: Any = None) -> Any:
            lengths = self._row_lengths
            if attn_mask is not None or lengths is None or len(lengths) != inps.shape[0]:
                return super()._model_call(inps, attn_mask, labels)
            positions = torch.arange(inps.shape[1], device=inps.device)
            mask = (positions[None] < torch.tensor(lengths, device=inps.device)[:, None]).long()
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None):
                return self.model(inps, attention_mask=mask).logits

    return PaddingAwareHFLM


def _drop_local_dataset_hint(record: logging.LogRecord) -> bool:
    # lm-eval logs for every task with a `custom_dataset` that it takes `--metadata` options; the local ones take none.
    return not record.getMessage().startswith(tuple(f"{task}: Custom kwargs" for task in LOCAL_TASKS))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="implicit-lm eval harness", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--tasks",
        required=True,
        help=f"comma-separated lm-eval task, group or tag names; 'paper' = {', '.join(PAPER_TASKS)}; "
        f"'local' = {', '.join(LOCAL_TASKS)} (offline)",
    )
    parser.add_argument("--num-fewshot", type=int, default=None, help="default: each task's own (0 for most)")
    parser.add_argument(
        "--limit", type=float, default=None, help="examples per task (a value below 1 is a fraction); for testing"
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--max-length", type=int, default=None, help="context window in tokens (default: the config's, else 2048)"
    )
    parser.add_argument(
        "--bootstrap-iters",
        type=int,
        default=100000,
        help="resamples for the standard errors of non-mean metrics such as perplexity; 0 skips all standard errors",
    )
    parser.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="extra folder of task YAMLs (repeatable); eval/tasks/ is always included",
    )
    parser.add_argument("--output", default="harness_results.json", help="JSON results file")
    return parser


def expand_task_names(spec: str) -> list[str]:
    """Split `--tasks` and expand the aliases `paper` and `local`, keeping order and dropping repeats."""
    names: list[str] = []
    for name in (part.strip() for part in spec.split(",")):
        for expanded in TASK_ALIASES.get(name, (name,) if name else ()):
            if expanded not in names:
                names.append(expanded)
    if not names:
        raise InputError(f"--tasks {spec!r} names no task")
    return names


def task_manager_for(names: list[str], include_paths: list[str]) -> Any:
    """A TaskManager that knows `names`. Indexing lm-eval's thousands of task YAMLs takes seconds, so it is only
    done when a name is neither local nor in an `--include-path` folder."""
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise InputError(f"--include-path {path} is not a folder")
    paths = [str(LOCAL_TASKS_DIR), *include_paths]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(name in manager.all_tasks for name in names):
        return manager
    manager = TaskManager(include_path=paths)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise InputError(
            f"Unknown task{'s' if len(hints) > 1 else ''} {'; '.join(hints)}. "
            f"Local tasks: {', '.join(LOCAL_TASKS)} (group implicit_local); aliases: paper, local; "
            "`lm_eval ls tasks` lists lm-eval's tasks."
        )
    return manager


def load_tasks(manager: Any, names: list[str]) -> dict[str, list[Any]]:
    """For each name, its Group or its Task(s) (a tag has several), with their data loaded."""
    loaded_by_name = {}
    requested_by: dict[str, str] = {}
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as error:  # typically a dataset that is neither cached nor downloadable (offline)
            raise InputError(f"Cannot load task {name!r}: {type(error).__name__}: {error}") from error
        # Each name runs on its own, so a task in two of them would run twice and have two results.
        for task in loaded["tasks"]:
            if task in requested_by:
                raise InputError(f"Task {task!r} is requested twice, by {requested_by[task]!r} and by {name!r}")
            requested_by[task] = name
        loaded_by_name[name] = [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
    return loaded_by_name


def plain(value: Any) -> Any:
    """lm-eval's results as strict JSON: numpy scalars become Python numbers and undefined values (NaN, such as the
    standard error of a single example) become null."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def task_entries(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One entry per task and group of an lm-eval result: its metrics (lm-eval's `metric,filter` keys, with the
    default filter's `,none` dropped; a standard error lm-eval did not compute is null), sample counts, few-shot
    count and version."""
    entries = {}
    for name, row in results["results"].items():
        metrics = {
            key.removesuffix(",none"): None if value == "N/A" else value
            for key, value in row.items()
            if key not in ("alias", "sample_len")
        }
        entry: dict[str, Any] = {"metrics": metrics}
        if name in results.get("n-samples", {}):
            entry["samples"] = results["n-samples"][name]
        if name in results.get("n-shot", {}):
            entry["num_fewshot"] = results["n-shot"][name]
        if name in results.get("versions", {}):
            entry["version"] = results["versions"][name]
        if name in results.get("group_subtasks", {}):
            entry["subtasks"] = results["group_subtasks"][name]
        entries[name] = entry
    return entries


def log_summary(tasks: dict[str, dict[str, Any]]) -> None:
    """One line per task: its metrics and mean/max solver iterations."""
    for name, entry in tasks.items():
        metrics = ", ".join(
            f"{key} {value:.4g}"
            for key, value in entry["metrics"].items()
            if isinstance(value, float) and "stderr" not in key
        )
        stats = [
            f"{kind} iterations mean {summary['iterations_mean']:.1f} max {summary['iterations_max']}"
            for kind, summary in entry.get("solver_stats", {}).items()
            if summary is not None
        ]
        logger.info("%s: %s", name, " | ".join([metrics or "-", *stats]))


@run_cli
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    names = expand_task_names(args.tasks)
    if args.limit is not None and args.limit <= 0:
        raise InputError(f"--limit {args.limit:g}: must be positive")
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: must be at least 1")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise InputError(f"lm-eval is not installed ({error}): pip install 'implicit-lm[eval]'") from error

    logging.getLogger("lm_eval.api.task").addFilter(_drop_local_dataset_hint)
    manager = task_manager_for(names, args.include_path)
    # Load every task's data before the model, so that a dataset that cannot be read stops the run before any work.
    specs = load_tasks(manager, names)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, overrides=solver_overrides(args))
    if tokenizer is None:
        raise InputError(f"{args.model} has no tokenizer files; lm-eval tasks are text")
    # lm-eval bounds generation with `max_length` (context + max_gen_toks); a `max_new_tokens` saved in the model's
    # generation config would take precedence over it and generate past the task's limit.
    model.generation_config.max_new_tokens = None
    lm = padding_aware_lm(HFLM)(
        pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=args.batch_size, max_length=args.max_length
    )
    implicit = is_implicit(model)

    tasks: dict[str, dict[str, Any]] = {}
    for name in names:
        logger.info("Task %s", name)
        with SolverStatsRecorder(model) as recorder:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=specs[name],
                task_manager=manager,  # without one, simple_evaluate indexes all of lm-eval's tasks again
                num_fewshot=args.num_fewshot,
                limit=limit,
                bootstrap_iters=args.bootstrap_iters,
                log_samples=False,
            )
        entries = task_entries(results)
        if implicit:
            # A group's or tag's statistics cover all its tasks (they ran in one call); a tag has no entry of its own.
            entries.setdefault(name, {"metrics": {}, "subtasks": sorted(entries)})["solver_stats"] = recorder.summary()
        tasks.update(entries)

    metadata = run_metadata(args, model)
    metadata["lm_eval"] = importlib.metadata.version("lm_eval")
    metadata["tasks"] = names
    payload = plain({"metadata": metadata, "tasks": tasks})
    log_summary(payload["tasks"])
    write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
