"""State tracking: word problems over S5 and A5 and the paper's mixed distribution D_p over A5 x M (the data and its
conventions are in `implicit_lm.tasks.word_problems`), and how trained models track their state.

Tokens and labels are stored as uint8. `implicit-lm eval state-tracking --group mixed --p 0.1 --length 256
--num-samples 4096 --seed 0 --output test.pt` writes them with their metadata (`torch.load(path)`).

Length generalisation (the paper's Figure 1 right and Figure 3): `--model DIR` (repeatable) evaluates trained models
on fresh word problems of each of `--lengths`, in sequential mode (token by token, each token iterated to its fixed
point: how the model runs as an RNN) and simultaneous mode (the whole sequence solved at once, with an iteration cap
that grows with the length: 2L by default), and reports per-token accuracy, solver iterations with the share of
solves that converged, and the share of simultaneous predictions identical to the sequential ones (duality), as
tables, `length_generalization.json` and `length_generalization.png`:

    implicit-lm eval state-tracking --model models/implicit-mamba2-a5 --model models/mamba2-16layer-a5 --group A5 \
        --lengths 32,64,128,256,1024 --num-samples 256 --simultaneous-caps 2L,config --simultaneous-max-length 256 \
        --output-dir eval_results
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from implicit_lm.eval.plots import new_figure, save_figure
from tqdm.auto import tqdm

from implicit_lm.cli import InputError, run_cli
from implicit_lm.files import atomic_write, write_json
from implicit_lm.models import is_implicit, load_model, solver_kwargs
from implicit_lm.provenance import run_metadata
from implicit_lm.tasks.word_problems import APERIODIC_ELEMENTS, GROUPS, get_monoid, hard_mask, sample
from modeling_implicit.configuration_implicit import MODES

# Sequential first: the model as an RNN, what the figures are about.
DEFAULT_MODES = tuple(reversed(MODES))
# Test sets of different lengths are drawn with different seeds (seed + LENGTH_SEED_STRIDE * length), so a longer
# test set is not an extension of a shorter one.
LENGTH_SEED_STRIDE = 7919


class Accuracy(NamedTuple):
    per_position: torch.Tensor  # (length,) float64: the fraction of samples whose label at t is predicted
    overall: float


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> Accuracy:
    """Per-position and overall accuracy of `predictions` (`(N, L)` ids, or `(N, L, vocab)` logits) on `labels`."""
    if predictions.dim() == labels.dim() + 1:
        predictions = predictions.argmax(-1)
    if labels.dim() != 2 or predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} do not match labels {tuple(labels.shape)}: expected (N, L) ids "
            "or (N, L, vocab) logits for (N, L) labels"
        )
    correct = (predictions.long() == labels.long()).double()
    return Accuracy(correct.mean(0), correct.mean().item())


# The solver's warning for solves that hit their cap: expected here (the evaluation reports the converged share).
NOT_CONVERGED_MESSAGE = "Fixed-point solver did not converge"


def mode_label(row: dict[str, Any]) -> str:
    """How a row was solved: `sequential`, `simultaneous (cap 2L)` / `(cap 128)`, or `explicit` (no solver)."""
    if row["mode"] != "simultaneous":
        return row["mode"]
    cap = row.get("cap_per_token")
    return f"simultaneous (cap {cap:g}L)" if cap is not None else f"simultaneous (cap {row['iteration_cap']})"


# Bootstrap of the accuracy interval: resamples of the test sequences, and the level of the percentile interval.
BOOTSTRAP_RESAMPLES = 2000
INTERVAL_LEVEL = 0.95


def bootstrap_interval(per_sequence: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES,
                       level: float = INTERVAL_LEVEL, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `per_sequence` (one value per test sequence: its per-token
    accuracy), resampling sequences with replacement: positions of one sequence are not independent (an early error
    in a long sequence tends to persist), sequences are. Seeded, so a table is reproducible."""
    generator = torch.Generator().manual_seed(seed)
    count = per_sequence.shape[0]
    means = per_sequence[torch.randint(count, (resamples, count), generator=generator)].mean(1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=means.dtype)).tolist()
    return low, high


@torch.no_grad()
def length_generalization(
    model: torch.nn.Module,
    group: str,
    lengths: list[int],
    num_samples: int,
    seed: int = 0,
    p: float | None = None,
    modes: tuple[str, ...] = DEFAULT_MODES,
    batch_size: int = 64,
    simultaneous_caps: tuple[float | None, ...] = (2.0,),
    simultaneous_max_length: int | None = None,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Accuracy and solver iterations of `model` on fresh word problems of each length, in each inference mode.

    One row per (length, mode[, cap]): `accuracy` (per token, over every position of every sample) with
    `accuracy_interval`, its 95% bootstrap interval over the `num_samples` sequences (`bootstrap_interval`),
    `sequence_accuracy` (samples with every position right), `final_accuracy` (the last position only), and for
    implicit models the solver iterations: per token in sequential mode, per whole-sequence solve in simultaneous mode
    (`iterations_mean`, `iterations_max`, `converged_fraction`: the share of solves that met the tolerance before the
    cap; the solver's non-convergence warnings are not raised, this column reports them).

    Simultaneous mode is solved once per entry of `simultaneous_caps`: a number c caps the solve at c * length
    iterations, or the model's `eval_max_iterations` where that is more (information crosses about one position per
    iteration, so a cap below the length cannot reach the sequential fixed point); None keeps the model's cap. Its rows
    carry `iteration_cap`, `cap_per_token` and, when sequential mode is evaluated too, `agreement`: the share of
    predictions identical to the sequential mode's (the duality of the two modes). `simultaneous_max_length` skips
    simultaneous mode on longer inputs (its cost grows with the square of the length). An explicit model (no solver) is
    evaluated once per length, in rows of mode `explicit`. `progress` shows a bar over the forward calls (None: on a
    terminal).
    """
    size = get_monoid(group).size
    if size > model.config.vocab_size:
        raise ValueError(f"{group} has {size} elements, more than the model's vocabulary ({model.config.vocab_size})")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}: choose from {MODES}")
    if any(cap is not None and cap <= 0 for cap in simultaneous_caps):
        raise ValueError(
            f"simultaneous_caps must be positive multiples of the length (or None), got {simultaneous_caps}")
    implicit = is_implicit(model)
    solves: list[tuple[int, str, float | None]] = []  # (length, mode, cap per token)
    for length in lengths:
        if not implicit:
            solves.append((length, "explicit", None))
            continue
        for mode in modes:
            if mode == "sequential":
                solves.append((length, mode, None))
            elif simultaneous_max_length is None or length <= simultaneous_max_length:
                solves.extend((length, mode, cap) for cap in simultaneous_caps)
    device = next(model.parameters()).device
    batches = -(-num_samples // batch_size)
    bar = tqdm(total=len(solves) * batches, desc=f"{group} lengths x modes", unit="batch", leave=False,
               disable=not progress if progress is not None else None)
    rows = []
    predictions: dict[tuple[int, str], torch.Tensor] = {}
    problems: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for length, mode, cap in solves:
        if length not in problems:  # one test set per length, shared by its modes and caps
            problems[length] = sample(group, num_samples, length, seed + LENGTH_SEED_STRIDE * length, p)
        tokens, labels = problems[length]
        overrides: dict[str, Any] = {}
        if mode != "explicit":
            overrides["inference_mode"] = mode
        if cap is not None:
            overrides["eval_max_iterations"] = max(model.config.eval_max_iterations, round(cap * length))
        predicted, iterations, converged = [], [], []
        for start in range(0, num_samples, batch_size):
            batch = tokens[start : start + batch_size].long().to(device)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=NOT_CONVERGED_MESSAGE)
                output = model(input_ids=batch, use_cache=False, **solver_kwargs(model, **overrides))
            predicted.append(output.logits.argmax(-1).cpu())
            stats = getattr(output, "solver_stats", None)
            if stats is not None and implicit:
                iterations.append(stats.iterations.flatten().cpu().double())
                converged.append(stats.converged.flatten().cpu())
            bar.update()
        predicted = torch.cat(predicted)
        correct = (predicted == labels.long()).double()
        row = {
            "length": length,
            "mode": mode,
            "num_samples": num_samples,
            "accuracy": correct.mean().item(),
            "accuracy_interval": list(bootstrap_interval(correct.mean(1))),
            "sequence_accuracy": correct.min(1).values.mean().item(),
            "final_accuracy": correct[:, -1].mean().item(),
            "iterations_mean": None,
            "iterations_max": None,
            "converged_fraction": None,
        }
        if iterations:
            iterations = torch.cat(iterations)
            row.update(iterations_mean=iterations.mean().item(), iterations_max=int(iterations.max().item()),
                       converged_fraction=torch.cat(converged).float().mean().item())
        if mode == "sequential":
            predictions[length, mode] = predicted
        elif mode == "simultaneous":
            reference = predictions.get((length, "sequential"))
            row.update(iteration_cap=overrides.get("eval_max_iterations", model.config.eval_max_iterations),
                       cap_per_token=cap,
                       agreement=None if reference is None else (predicted == reference).double().mean().item())
        rows.append(row)
    bar.close()
    return rows


def duality_rows(model: torch.nn.Module, group: str, lengths: list[int], num_samples: int, seed: int = 0,
                 caps: tuple[float | None, ...] = (2.0, None)) -> list[dict[str, Any]]:
    """The duality of the modes on one test set per length: the simultaneous rows of `length_generalization`, one
    per cap, each with its `agreement` with the sequential predictions on the same problems (in one batch)."""
    rows = length_generalization(model, group, lengths, num_samples, seed=seed, simultaneous_caps=caps,
                                 batch_size=num_samples)
    return [row for row in rows if row["mode"] == "simultaneous"]


def _by_label(entry: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for row in entry["rows"]:
        rows.setdefault(mode_label(row), {})[row["length"]] = row
    return rows


def _accuracy_cell(row: dict[str, Any]) -> str:
    """`0.980 [0.972, 0.987] (n=512)`: the accuracy, its interval and the sequences it was measured on (figures
    recorded before intervals were: the accuracy alone)."""
    interval = row.get("accuracy_interval")
    if interval is None:
        return f"{row['accuracy']:.3f}"
    return f"{row['accuracy']:.3f} [{interval[0]:.3f}, {interval[1]:.3f}] (n={row['num_samples']})"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown tables: per-token accuracy at each length, one line per (model, mode), with its 95% bootstrap interval
    over the test sequences where the rows have one and the number of sequences; then the solver iterations
    (mean per token in sequential mode, per solve in simultaneous mode) with the share of solves that converged;
    then, where simultaneous mode ran beside sequential mode, the share of identical predictions (duality)."""
    lengths = sorted({row["length"] for entry in results.values() for row in entry["rows"]})
    columns = [f"{n}" for n in lengths]
    accuracy = ["| model | params | mode | " + " | ".join(f"acc@{n}" for n in columns) + " |",
                "|" + "---|" * (3 + len(lengths))]
    iterations = ["| model | mode | " + " | ".join(f"iters (converged) @{n}" for n in columns) + " |",
                  "|" + "---|" * (2 + len(lengths))]
    duality = ["| model | mode | " + " | ".join(f"same as sequential @{n}" for n in columns) + " |",
               "|" + "---|" * (2 + len(lengths))]
    for name, entry in results.items():
        for label, by_length in _by_label(entry).items():
            cells = [_accuracy_cell(by_length[n]) if n in by_length else "" for n in lengths]
            accuracy.append(f"| {name} | {entry['parameters'] / 1e3:.0f}K | {label} | " + " | ".join(cells) + " |")
            if any(row["iterations_mean"] is not None for row in by_length.values()):
                cells = [f"{by_length[n]['iterations_mean']:.1f} ({by_length[n]['converged_fraction']:.1%})"
                         if n in by_length else "" for n in lengths]
                iterations.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
            if any(row.get("agreement") is not None for row in by_length.values()):
                cells = [f"{by_length[n]['agreement']:.4f}" if by_length.get(n, {}).get("agreement") is not None
                         else "" for n in lengths]
                duality.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    tables = ["\n".join(accuracy)]
    if len(iterations) > 2:
        tables.append("Solver iterations (share of solves converged):\n\n" + "\n".join(iterations))
    if len(duality) > 2:
        tables.append("Duality, predictions identical to sequential mode's:\n\n" + "\n".join(duality))
    return "\n\n".join(tables)


def plot_length_generalization(panels: dict[str, dict[str, dict[str, Any]]], path: Path,
                               train_length: int | None = None) -> None:
    """One row of panels per entry of `panels` (title -> results, e.g. one per group): accuracy vs length (left;
    solid sequential or explicit, dashed simultaneous) and solver iterations vs length (right: per token in
    sequential mode, per sequence solve in simultaneous mode) for every model, like Figure 1 right."""
    figure, axes = new_figure(columns=2, rows=len(panels))
    for (title, results), (left, right) in zip(panels.items(), axes):
        for index, (name, entry) in enumerate(results.items()):
            for style_index, (label, by_length) in enumerate(_by_label(entry).items()):
                lengths = sorted(by_length)
                rows = [by_length[n] for n in lengths]
                style = ("-", "--", ":", "-.")[style_index % 4]
                left.plot(lengths, [row["accuracy"] for row in rows], style, marker="o", color=f"C{index}",
                          label=f"{name} ({label})")
                if rows[0]["iterations_mean"] is not None:
                    right.plot(lengths, [row["iterations_mean"] for row in rows], style, marker="s",
                               color=f"C{index}", label=f"{name} ({label})")
        for axis in (left, right):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("sequence length")
            axis.grid(alpha=0.3)
            if train_length is not None:
                axis.axvline(train_length, color="grey", linestyle=":", label=f"train length {train_length}")
        left.set_title(f"{title}: per-token accuracy")
        left.set_ylabel("per-token accuracy")
        left.set_ylim(0, 1.02)
        right.set_title(f"{title}: solver iterations (per token / per sequence solve)")
        right.set_ylabel("solver iterations")
        right.set_yscale("log")
        left.legend(fontsize=7)
        if right.lines:
            right.legend(fontsize=7)
    save_figure(figure, path)


def model_labels(folders: list[str]) -> dict[str, str]:
    """A short, unique label per model folder: its name, or `parent/name` where names repeat (`run/final`)."""
    names = [Path(folder).name for folder in folders]
    labels = {}
    for folder, name in zip(folders, names):
        label = name if names.count(name) == 1 else f"{Path(folder).parent.name}/{name}"
        if label in labels:
            raise InputError(f"--model {folder} is given twice (or two folders share the label {label!r})")
        labels[label] = folder
    return labels


def parse_caps(text: str) -> tuple[float | None, ...]:
    """`--simultaneous-caps`: comma-separated multiples of the length, or `config` (the model's own cap)."""
    caps: list[float | None] = []
    for part in text.split(","):
        part = part.strip()
        try:
            cap = None if part == "config" else float(part.removesuffix("L"))
        except ValueError as error:
            raise InputError(
                f"--simultaneous-caps {text!r}: give multiples of the length (2 or 2L) or config") from error
        if cap is not None and cap <= 0:
            raise InputError(f"--simultaneous-caps {text!r}: multiples of the length must be positive")
        caps.append(cap)
    return tuple(caps)


def evaluate_models(args: argparse.Namespace) -> dict[str, Any]:
    """`--model` mode of the CLI: length generalisation of every model, as JSON, PNG and a printed table."""
    try:
        lengths = [int(part) for part in args.lengths.split(",")]
    except ValueError as error:
        raise InputError(f"--lengths must be comma-separated integers, got {args.lengths!r}") from error
    if not lengths or min(lengths) < 1:
        raise InputError(f"--lengths must be positive, got {args.lengths!r}")
    modes = tuple(part.strip() for part in args.modes.split(","))
    if not modes or set(modes) - set(MODES):
        raise InputError(f"--modes {args.modes!r}: choose from {','.join(MODES)}")
    caps = parse_caps(args.simultaneous_caps)
    num_samples = 256 if args.num_samples is None else args.num_samples
    results: dict[str, dict[str, Any]] = {}
    for name, folder in model_labels(args.model).items():
        model, _ = load_model(folder, device=args.device)
        try:
            rows = length_generalization(model, args.group, lengths, num_samples, args.seed, args.p, modes,
                                         args.batch_size, caps, args.simultaneous_max_length)
        except ValueError as error:
            raise InputError(f"{folder}: {error}") from error
        results[name] = {"path": str(folder), "parameters": sum(p.numel() for p in model.parameters()),
                         "implicit": is_implicit(model), "rows": rows}
    payload = {"group": args.group, "p": args.p, "num_samples": num_samples, "seed": args.seed,
               "results": results, "metadata": run_metadata(args)}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.output_dir / "length_generalization.json", payload)
    plot_length_generalization({args.group: results}, args.output_dir / "length_generalization.png",
                               args.train_length)
    print(format_table(results))
    print(f"wrote {args.output_dir / 'length_generalization.json'} and length_generalization.png")
    return payload


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="implicit-lm eval state-tracking", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--group", required=True, choices=GROUPS, help="S5, A5, or mixed (D_p over A5 x M)")
    parser.add_argument("--p", type=float, help="mixed only: probability of a hard (non-identity) A5 element")
    parser.add_argument("--length", type=int, default=64, help="tokens per sample (default 64)")
    parser.add_argument("--num-samples", type=int, help="sequences to draw (default 1000; with --model: 256/length)")
    parser.add_argument("--seed", type=int, default=0, help="of the torch.Generator (default 0)")
    parser.add_argument("--output", type=Path, help=".pt file for tokens, labels and metadata")
    evaluation = parser.add_argument_group("evaluating trained models (instead of --output)")
    evaluation.add_argument("--model", action="append", help="Hub-layout model folder; repeat to compare models")
    evaluation.add_argument("--lengths", default="32,64,128,256", help="comma-separated test lengths")
    evaluation.add_argument("--modes", default=",".join(DEFAULT_MODES), help="inference modes (default: both)")
    evaluation.add_argument("--simultaneous-caps", default="2L",
                            help="iteration caps of simultaneous mode: multiples of the length (2L) or `config` "
                                 "(the model's eval_max_iterations); comma-separated for several (default 2L)")
    evaluation.add_argument("--simultaneous-max-length", type=int,
                            help="skip simultaneous mode on longer inputs (its cost grows with the length squared)")
    evaluation.add_argument("--batch-size", type=int, default=64, help="sequences per forward (default 64)")
    evaluation.add_argument("--train-length", type=int, help="marks the training length on the plot")
    evaluation.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    evaluation.add_argument("--output-dir", type=Path, default=Path("eval_results"))
    return parser


@run_cli
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Generate and save a data set, or (`--model`) evaluate models; input errors exit with status 2 (`run_cli`).
    Returns what was saved."""
    args = build_parser().parse_args(argv)
    if (args.model is None) == (args.output is None):
        raise InputError("pass --output (generate a data set) or --model (evaluate models), not both")
    if args.num_samples is not None and args.num_samples < 1:
        raise InputError(f"--num-samples {args.num_samples} must be positive")
    if args.group == "mixed":
        if args.p is None:
            raise InputError("--group mixed needs --p, the probability of a hard A5 element")
        if not 0 <= args.p <= 1:
            raise InputError(f"--p {args.p}: must be a probability in [0, 1]")
    elif args.p is not None:
        raise InputError(f"--p applies to --group mixed only, not {args.group}")
    if args.model is not None:
        if args.batch_size < 1:
            raise InputError(f"--batch-size {args.batch_size} must be positive")
        return evaluate_models(args)
    if args.length < 1:
        raise InputError(f"--length {args.length} must be positive")
    num_samples = 1000 if args.num_samples is None else args.num_samples
    tokens, labels = sample(args.group, num_samples, args.length, args.seed, args.p)

    metadata = {
        "group": get_monoid(args.group).name,
        "vocab_size": get_monoid(args.group).size,
        "p": args.p,
        "num_samples": num_samples,
        "length": args.length,
        "seed": args.seed,
        "composition": "(a * b)(i) = a(b(i)); labels[t] = tokens[0] * ... * tokens[t]",
        # Through JSON to plain types (`torch.__version__` is a str subclass), so `weights_only` loading reads it.
        "run": json.loads(json.dumps(run_metadata(args))),
    }
    if args.group == "mixed":
        metadata["token_layout"] = f"4 * a5_index + monoid_index (monoid {', '.join(APERIODIC_ELEMENTS)})"
        metadata["hard_fraction"] = hard_mask(tokens).double().mean().item()
    payload = {"tokens": tokens, "labels": labels, "metadata": metadata}
    atomic_write(args.output, lambda temporary: torch.save(payload, temporary))
    hard = f", {metadata['hard_fraction']:.2%} hard tokens" if args.group == "mixed" else ""
    print(
        f"{num_samples} x {args.length} tokens of {metadata['group']} (vocabulary {metadata['vocab_size']}"
        f"{hard}) -> {args.output}"
    )
    return payload


if __name__ == "__main__":
    main()
