"""Duality of the two modes: next-token predictions of the simultaneous and the sequential mode on the same inputs.

    implicit-lm eval duality --model DIR --data FILE --seq-len 256 [--max-sequences 16] [--output-dir DIR]

A model trained in the simultaneous mode (all tokens iterate together) is run again in the sequential mode (token by
token, each solved to convergence before its state is committed), on identical packed rows. Reports the greedy
token match rate (the paper: 97.6% for its 1.3B implicit Mamba2), the perplexity of each mode, the distribution of
the per-token perplexity difference (Figure 2C) and example rows like the paper's Table 8.

Writes `duality.json` and `duality.png` (histogram of the per-token perplexity differences) to `--output-dir`.
"""

from __future__ import annotations

import argparse
import math
import time
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

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


@torch.no_grad()
def mode_logits(model: torch.nn.Module, rows: torch.Tensor, mode: str) -> torch.Tensor:
    """Logits of a full forward over `rows` solved in `mode` (no cache kept)."""
    return model(rows, use_cache=False, **solver_kwargs(model, inference_mode=mode)).logits


def decode(tokenizer: Any, ids: list[int]) -> str | list[int]:
    return ids if tokenizer is None else tokenizer.decode(ids)


def example_rows(
    tokenizer: Any, rows: torch.Tensor, predictions: dict[str, torch.Tensor], count: int, length: int
) -> list[dict[str, Any]]:
    """The first `length` positions of the first `count` rows: the input, and each mode's greedy next-token
    predictions at every position (the paper's Table 8)."""
    examples = []
    for index in range(min(count, rows.shape[0])):
        span = slice(0, min(length, rows.shape[1] - 1))
        sim, seq = predictions["simultaneous"][index, span], predictions["sequential"][index, span]
        examples.append({
            "input": decode(tokenizer, rows[index, span].tolist()),
            "target": decode(tokenizer, rows[index, 1:][span].tolist()),
            "simultaneous": decode(tokenizer, sim.tolist()),
            "sequential": decode(tokenizer, seq.tolist()),
            "match_rate": (sim == seq).float().mean().item(),
        })
    return examples


def plot(differences: torch.Tensor, match_rate: float, path: Path) -> None:
    figure, axes = new_figure()
    axis = axes[0, 0]
    axis.hist(differences.numpy(), bins=60, color="tab:blue")
    axis.set_yscale("log")
    axis.set_xlabel("per-token perplexity difference (sequential - simultaneous)")
    axis.set_ylabel("tokens")
    axis.set_title(f"duality of the modes: {100 * match_rate:.1f}% greedy token match")
    axis.grid(alpha=0.3)
    save_figure(figure, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="implicit-lm eval duality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    add_data_arguments(parser, seq_len=256)
    parser.add_argument("--examples", type=int, default=4, help="example rows to keep (default 4)")
    parser.add_argument("--example-length", type=int, default=24, help="positions per example row (default 24)")
    parser.add_argument("--output-dir", type=Path, default=Path("eval_results"))
    args = parser.parse_args(argv)
    check_positive(parser, args, "seq_len", "batch_size", "max_sequences", "example_length")
    if args.examples < 0:
        parser.error(f"--examples must not be negative, got {args.examples}")
    if args.inference_mode is not None:
        parser.error("--inference-mode does not apply: this command runs both modes")
    return args


@run_cli
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, overrides=solver_overrides(args))
    if not is_implicit(model):
        raise InputError(f"{args.model} is not an implicit model: it has a single mode, there is no duality to measure")
    rows = load_rows(args, model, tokenizer)

    predictions: dict[str, list[torch.Tensor]] = {mode: [] for mode in MODES}
    nll: dict[str, list[torch.Tensor]] = {mode: [] for mode in MODES}
    seconds = dict.fromkeys(MODES, 0.0)
    recorders = {mode: SolverStatsRecorder(model) for mode in MODES}
    for batch in tqdm(rows.split(args.batch_size), desc="duality", unit="batch"):
        batch = batch.to(args.device)
        for mode in MODES:
            start = time.perf_counter()
            with recorders[mode]:
                logits = mode_logits(model, batch, mode)[:, :-1]
            seconds[mode] += time.perf_counter() - start
            predictions[mode].append(logits.argmax(-1).cpu())
            nll[mode].append(next_token_nll(logits, batch[:, 1:]).double().cpu())
    joined_predictions = {mode: torch.cat(predictions[mode]) for mode in MODES}
    joined_nll = {mode: torch.cat(nll[mode]) for mode in MODES}
    solver_stats = {mode: recorders[mode].summary() for mode in MODES}

    match = joined_predictions["simultaneous"] == joined_predictions["sequential"]
    match_rate = match.double().mean().item()
    per_token_difference = (joined_nll["sequential"].exp() - joined_nll["simultaneous"].exp()).flatten()
    nll_difference = (joined_nll["sequential"] - joined_nll["simultaneous"]).flatten()
    quantiles = torch.quantile(per_token_difference, torch.tensor(QUANTILES, dtype=torch.float64))
    results = {
        "token_match_rate": match_rate,
        "tokens": int(match.numel()),
        "sequences": rows.shape[0],
        "seq_len": args.seq_len,
        "perplexity": {mode: math.exp(joined_nll[mode].mean().item()) for mode in MODES},
        "per_token_perplexity_difference": {
            "mean": per_token_difference.mean().item(),
            "mean_abs": per_token_difference.abs().mean().item(),
            "max_abs": per_token_difference.abs().max().item(),
            **{f"q{round(100 * q):02d}": value.item() for q, value in zip(QUANTILES, quantiles)},
        },
        "nll_difference_max_abs": nll_difference.abs().max().item(),
        "examples": example_rows(tokenizer, rows, joined_predictions, args.examples, args.example_length),
        "solver_stats": solver_stats,
        "seconds": seconds,
        "metadata": run_metadata(args, model),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.output_dir / "duality.json", results)
    plot(per_token_difference, match_rate, args.output_dir / "duality.png")
    print(
        f"token match {100 * match_rate:.2f}% over {results['tokens']} tokens; perplexity simultaneous "
        f"{results['perplexity']['simultaneous']:.3f}, sequential {results['perplexity']['sequential']:.3f}"
    )
    return results


if __name__ == "__main__":
    main()
