"""State tracking: word problems over S5 and A5 and the paper's mixed distribution D_p over A5 x M (the data and its
conventions are in `implicit_lm.tasks.word_problems`), and how trained models track their state.

Tokens and labels are stored as uint8. `implicit-lm eval state-tracking --group mixed --p 0.1 --length 256
--num-samples 4096 --seed 0 --output test.pt` writes them with their metadata (`torch.load(path)`).

Length generalisation (the paper's Figure 1 right and Figure 3): `--model DIR` (repeatable) evaluates trained models
on fresh word problems of each of `--lengths`, in sequential mode (token by token, each token iterated to its fixed
point: how the model runs as an RNN) and simultaneous mode (the whole sequence solved at once), and reports per-token
accuracy and solver iterations per length as a table, `length_generalization.json` and `length_generalization.png`:

    implicit-lm eval state-tracking --model models/implicit-mamba2-a5 --model models/mamba2-a5-4layer --group A5 \
        --lengths 32,64,128,256 --num-samples 256 --output-dir eval_results
"""

from __future__ import annotations

import argparse
import json
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
) -> list[dict[str, Any]]:
    """Accuracy and solver iterations of `model` on fresh word problems of each length, in each inference mode.

    One row per (length, mode): `accuracy` (per token, over every position of every sample), `sequence_accuracy`
    (samples with every position right), `final_accuracy` (the last position only), and for implicit models the
    solver iterations: per token in sequential mode, per whole-sequence solve in simultaneous mode
    (`iterations_mean`, `iterations_max`, `converged_fraction`). Explicit models report `None` iterations.
    """
    size = get_monoid(group).size
    if size > model.config.vocab_size:
        raise ValueError(f"{group} has {size} elements, more than the model's vocabulary ({model.config.vocab_size})")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}: choose from {MODES}")
    device = next(model.parameters()).device
    rows = []
    progress = tqdm(total=len(lengths) * len(modes), desc="lengths x modes", unit="eval", leave=False, disable=None)
    for length in lengths:
        tokens, labels = sample(group, num_samples, length, seed + LENGTH_SEED_STRIDE * length, p)
        for mode in modes:
            correct, iterations, converged = [], [], []
            for start in range(0, num_samples, batch_size):
                batch = tokens[start : start + batch_size].long().to(device)
                output = model(input_ids=batch, use_cache=False, **solver_kwargs(model, inference_mode=mode))
                correct.append(output.logits.argmax(-1).cpu() == labels[start : start + batch_size].long())
                stats = getattr(output, "solver_stats", None)
                if stats is not None and is_implicit(model):
                    iterations.append(stats.iterations.flatten().cpu().double())
                    converged.append(stats.converged.flatten().cpu())
            correct = torch.cat(correct).double()
            row = {
                "length": length,
                "mode": mode,
                "accuracy": correct.mean().item(),
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
            rows.append(row)
            progress.update()
    progress.close()
    return rows


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one line per (model, mode), per-token accuracy at each length, then mean iterations."""
    lengths = sorted({row["length"] for entry in results.values() for row in entry["rows"]})
    header = ["model", "params", "mode", *[f"acc@{n}" for n in lengths], *[f"iters@{n}" for n in lengths]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in results.items():
        for mode in dict.fromkeys(row["mode"] for row in entry["rows"]):
            by_length = {row["length"]: row for row in entry["rows"] if row["mode"] == mode}
            accuracies = [f"{by_length[n]['accuracy']:.3f}" if n in by_length else "" for n in lengths]
            iterations = [
                f"{by_length[n]['iterations_mean']:.1f}" if by_length.get(n, {}).get("iterations_mean") is not None
                else "-" for n in lengths
            ]
            lines.append(f"| {name} | {entry['parameters'] / 1e3:.0f}K | {mode} | " + " | ".join(
                accuracies + iterations) + " |")
    return "\n".join(lines)


def plot_length_generalization(results: dict[str, dict[str, Any]], path: Path, train_length: int | None = None
                               ) -> None:
    """Accuracy vs length (left; solid sequential, dashed simultaneous) and solver iterations vs length (right:
    per token in sequential mode, per sequence solve in simultaneous mode) for every model, like Figure 1 right."""
    figure, axes = new_figure(columns=2)
    left, right = axes[0]
    styles = {"sequential": "-", "simultaneous": "--"}
    for index, (name, entry) in enumerate(results.items()):
        color = f"C{index}"
        for mode in dict.fromkeys(row["mode"] for row in entry["rows"]):
            rows = [row for row in entry["rows"] if row["mode"] == mode]
            lengths = [row["length"] for row in rows]
            left.plot(lengths, [row["accuracy"] for row in rows], styles[mode], marker="o", color=color,
                      label=f"{name} ({mode})")
            if rows[0]["iterations_mean"] is not None:
                right.plot(lengths, [row["iterations_mean"] for row in rows], styles[mode], marker="s", color=color,
                           label=f"{name} ({'per token' if mode == 'sequential' else 'per sequence'})")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length")
        axis.grid(alpha=0.3)
        if train_length is not None:
            axis.axvline(train_length, color="grey", linestyle=":", label=f"train length {train_length}")
    left.set_ylabel("per-token accuracy")
    left.set_ylim(0, 1.02)
    right.set_ylabel("solver iterations")
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
    num_samples = 256 if args.num_samples is None else args.num_samples
    results: dict[str, dict[str, Any]] = {}
    for name, folder in model_labels(args.model).items():
        model, _ = load_model(folder, device=args.device)
        try:
            rows = length_generalization(model, args.group, lengths, num_samples, args.seed, args.p, modes,
                                         args.batch_size)
        except ValueError as error:
            raise InputError(f"{folder}: {error}") from error
        results[name] = {"path": str(folder), "parameters": sum(p.numel() for p in model.parameters()),
                         "implicit": is_implicit(model), "rows": rows}
    payload = {"group": args.group, "p": args.p, "num_samples": num_samples, "seed": args.seed,
               "results": results, "metadata": run_metadata(args)}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.output_dir / "length_generalization.json", payload)
    plot_length_generalization(results, args.output_dir / "length_generalization.png", args.train_length)
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
