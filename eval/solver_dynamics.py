"""Solver dynamics: iterations and final relative residuals (the paper's Table 6), and the test-time compute curve
(next-token accuracy and perplexity against the iteration cap, Figure 1 centre).

    implicit-lm eval solver-dynamics --model DIR --data FILE --seq-len 256 [--modes simultaneous,sequential]
        [--iteration-caps 1,2,4,8,16,32,64] [--output-dir DIR]

Part 1 solves every row in each of `--modes` with the model's solver settings (or the overrides) and reports the
mean, percentiles and maximum of the iterations and the final relative residual `||f(z) - z|| / ||z||`: one value
per row in the simultaneous mode (the whole row converges together), one per token in the sequential mode.

Part 2 repeats the simultaneous solve (`--curve-mode` to change) with the iteration cap set to each of
`--iteration-caps` and records next-token accuracy, perplexity and the iterations actually used: how much test-time
compute the model turns into quality. Samples that hit a cap are expected there, so convergence warnings are muted.

Writes `solver_dynamics.json` and `solver_dynamics.png` to `--output-dir`.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from implicit_lm.eval.arguments import add_data_arguments, add_model_arguments, load_rows, solver_overrides
from implicit_lm.eval.plots import new_figure, save_figure
from implicit_lm.eval.stats import SolverStatsRecorder
from tqdm.auto import tqdm

from implicit_lm.cli import InputError, check_positive, run_cli
from implicit_lm.files import write_json
from implicit_lm.models import is_implicit, load_model, solver_kwargs
from implicit_lm.provenance import run_metadata
from modeling_implicit.configuration_implicit import MODES

from .perplexity import next_token_nll

DEFAULT_CAPS = "1,2,4,8,16,32,64"


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, rows: torch.Tensor, batch_size: int, device: str, description: str, **overrides: Any
) -> tuple[dict[str, Any], torch.Tensor]:
    """Next-token accuracy, perplexity and solver statistics of `rows` with the solver `overrides` on top of the
    model's config, and every recorded iteration count (per row or per token)."""
    correct = total = 0
    nll_sum = 0.0
    with SolverStatsRecorder(model) as recorder:
        for batch in tqdm(rows.split(batch_size), desc=description, unit="batch", leave=False):
            batch = batch.to(device)
            logits = model(batch, use_cache=False, **solver_kwargs(model, **overrides)).logits[:, :-1]
            targets = batch[:, 1:]
            correct += (logits.argmax(-1) == targets).sum().item()
            nll_sum += next_token_nll(logits, targets).double().sum().item()
            total += targets.numel()
    records = recorder.per_sequence + recorder.per_token
    iterations = torch.cat([r["iterations"] for r in records])
    return {
        "accuracy": correct / total,
        "perplexity": math.exp(nll_sum / total),
        "tokens": total,
        "solver_stats": recorder.summary(),
    }, iterations


def _stats_of(summary: dict[str, Any], mode: str) -> dict[str, Any]:
    return summary["per_token" if mode == "sequential" else "per_sequence"]


def plot(iterations: dict[str, torch.Tensor], curve: list[dict[str, Any]], curve_mode: str, path: Path) -> None:
    figure, axes = new_figure(columns=2)
    left, right = axes[0]
    for mode, counts in iterations.items():
        unit = "per token" if mode == "sequential" else "per row"
        bins = range(int(counts.min()), int(counts.max()) + 2)
        left.hist(counts.numpy(), bins=bins, density=True, alpha=0.6, label=f"{mode} ({unit})")
    left.set_xlabel("solver iterations")
    left.set_ylabel("fraction")
    left.set_title("iterations to converge")
    left.legend()
    left.grid(alpha=0.3)
    caps = [point["iteration_cap"] for point in curve]
    right.plot(caps, [point["accuracy"] for point in curve], marker="o", color="tab:green")
    right.set_xscale("log", base=2)
    right.set_xlabel(f"iteration cap ({curve_mode} mode)")
    right.set_ylabel("next-token accuracy", color="tab:green")
    twin = right.twinx()
    twin.plot(caps, [point["perplexity"] for point in curve], marker="s", color="tab:red")
    twin.set_ylabel("perplexity", color="tab:red")
    twin.set_yscale("log")
    right.set_title("test-time compute")
    right.grid(alpha=0.3)
    save_figure(figure, path)


def parse_caps(text: str) -> list[int]:
    try:
        caps = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--iteration-caps must be comma-separated integers, got {text!r}") from error
    if not caps or caps[0] < 1:
        raise argparse.ArgumentTypeError(f"--iteration-caps must be positive integers, got {text!r}")
    return caps


def parse_modes(text: str) -> list[str]:
    modes = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if not modes or unknown:
        raise argparse.ArgumentTypeError(f"--modes takes a comma-separated subset of {list(MODES)}, got {text!r}")
    return modes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="implicit-lm eval solver-dynamics", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    add_data_arguments(parser, seq_len=256)
    parser.add_argument("--modes", type=parse_modes, default=list(MODES), help="default: simultaneous,sequential")
    parser.add_argument("--iteration-caps", type=parse_caps, default=parse_caps(DEFAULT_CAPS),
                        help=f"iteration caps of the test-time compute curve (default {DEFAULT_CAPS})")
    parser.add_argument("--curve-mode", choices=MODES, default="simultaneous")
    parser.add_argument("--output-dir", type=Path, default=Path("eval_results"))
    args = parser.parse_args(argv)
    check_positive(parser, args, "seq_len", "batch_size", "max_sequences")
    if args.inference_mode is not None:
        parser.error("--inference-mode does not apply: use --modes and --curve-mode")
    if args.stop_mode is not None:
        parser.error("--stop-mode does not apply: residuals are reported relative (stop_mode 'rel')")
    return args


@run_cli
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, overrides=solver_overrides(args))
    if not is_implicit(model):
        raise InputError(f"{args.model} is not an implicit model: it runs no solver")
    relative = {"stop_mode": "rel"}  # Table 6 reports relative residuals; the tolerance then is relative as well
    rows = load_rows(args, model, tokenizer)

    dynamics, iterations = {}, {}
    for mode in args.modes:
        dynamics[mode], iterations[mode] = evaluate(
            model, rows, args.batch_size, args.device, f"solve ({mode})", inference_mode=mode, **relative
        )
    curve = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # capped solves do not converge, by design
        for cap in tqdm(args.iteration_caps, desc="test-time compute curve", unit="cap"):
            point, _ = evaluate(model, rows, args.batch_size, args.device, f"cap {cap}",
                                inference_mode=args.curve_mode, eval_max_iterations=cap, **relative)
            stats = _stats_of(point.pop("solver_stats"), args.curve_mode)
            curve.append({
                "iteration_cap": cap,
                **point,
                "iterations_mean": stats["iterations_mean"],
                "converged_fraction": stats["converged_fraction"],
                "residual_mean": stats["residual_mean"],
            })

    results = {
        "tolerance": model.config.tolerance,
        "eval_max_iterations": model.config.eval_max_iterations,
        "dynamics": dynamics,
        "test_time_compute": {"mode": args.curve_mode, "points": curve},
        "sequences": rows.shape[0],
        "seq_len": args.seq_len,
        "metadata": run_metadata(args, model),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.output_dir / "solver_dynamics.json", results)
    plot(iterations, curve, args.curve_mode, args.output_dir / "solver_dynamics.png")
    for mode, result in dynamics.items():
        stats = _stats_of(result["solver_stats"], mode)
        print(f"{mode}: {stats['iterations_mean']:.1f} iterations on average (p90 {stats['iterations_p90']:.0f}, max "
              f"{stats['iterations_max']}), final relative residual {stats['residual_mean']:.2e}, "
              f"{100 * stats['converged_fraction']:.1f}% converged")
    print("test-time compute: " + ", ".join(f"cap {p['iteration_cap']}: acc {p['accuracy']:.3f}" for p in curve))
    return results


if __name__ == "__main__":
    main()
