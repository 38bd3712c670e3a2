"""Perplexity on a text/JSONL/token file, with per-position buckets for length-extrapolation curves.

    implicit-lm eval perplexity --model DIR --data FILE --seq-len 2048 [--train-length 512] [--bucket-size 128]
        [--inference-mode sequential] [--output-dir DIR]

The data is tokenized, concatenated and packed into rows of `--seq-len` tokens. Every position's next-token loss is
accumulated by position, so one run gives the overall perplexity, a perplexity per bucket of `--bucket-size`
positions, and (with `--train-length L`) the perplexity over positions [0, L), [L, 2L), [2L, 4L), [4L, 8L): how the
model extrapolates beyond the length it was trained on (the paper's Table 7 / Figure 4).

The default simultaneous mode solves each row in one parallel forward. `--inference-mode sequential` streams each row
through the model's cache in chunks of `--chunk-size` tokens, every token solved to convergence before its state is
committed: memory stays constant in the sequence length for Mamba2 (the cache is a fixed-size state). Any
transformers causal LM works as an explicit baseline (simultaneous mode only).

Writes `perplexity.json` and `perplexity.png` to `--output-dir`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from implicit_lm.eval.arguments import add_data_arguments, add_model_arguments, load_rows, solver_overrides
from implicit_lm.eval.plots import new_figure, save_figure
from implicit_lm.eval.stats import SolverStatsRecorder
from tqdm.auto import tqdm

from implicit_lm.cli import check_positive, run_cli
from implicit_lm.files import write_json
from implicit_lm.models import is_implicit, load_model, solver_kwargs
from implicit_lm.provenance import run_metadata
from modeling_implicit.compat import cache_field, output_cache

EXTRAPOLATION_FACTORS = (1, 2, 4, 8)


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood (nats) of `targets` under `logits`: `(batch, length)`."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


@torch.no_grad()
def simultaneous_nll(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Next-token losses of `rows` `(batch, seq_len)` from one full forward: `(batch, seq_len - 1)`."""
    logits = model(rows, use_cache=False).logits
    return next_token_nll(logits[:, :-1], rows[:, 1:])


@torch.no_grad()
def streamed_nll(model: torch.nn.Module, rows: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Next-token losses of `rows`, solved token by token and streamed through the cache `chunk_size` tokens at a time:
    `(batch, seq_len - 1)`. Only one chunk of logits and the model's cache are alive at any time."""
    cache, previous_last = None, None
    losses = []
    sequential = solver_kwargs(model, prefill_mode="sequential")
    for start in range(0, rows.shape[1], chunk_size):
        chunk = rows[:, start : start + chunk_size]
        # The cache under the installed transformers' name: baselines may be any transformers causal LM.
        output = model(chunk, **cache_field(cache), use_cache=True, **sequential)
        cache = output_cache(output)
        logits = output.logits
        if previous_last is not None:  # the previous chunk's last position predicts this chunk's first token
            losses.append(next_token_nll(previous_last, chunk[:, :1]))
        losses.append(next_token_nll(logits[:, :-1], chunk[:, 1:]))
        previous_last = logits[:, -1:]
    return torch.cat(losses, dim=1)


def bucket_perplexities(nll_sum: torch.Tensor, counts: torch.Tensor, bucket_size: int) -> list[dict[str, Any]]:
    """Perplexity over each bucket of `bucket_size` positions; position p predicts token p + 1 with p + 1 tokens of
    context."""
    buckets = []
    for start in range(0, nll_sum.numel(), bucket_size):
        end = min(start + bucket_size, nll_sum.numel())
        nll = nll_sum[start:end].sum() / counts[start:end].sum()
        buckets.append({"start": start, "end": end, "nll": nll.item(), "perplexity": math.exp(nll.item())})
    return buckets


def extrapolation_ranges(
    nll_sum: torch.Tensor, counts: torch.Tensor, train_length: int
) -> dict[str, dict[str, Any]]:
    """Perplexity over [0, L), [L, 2L), [2L, 4L), [4L, 8L) for train length L, where the rows reach that far."""
    ranges = {}
    start = 0
    for factor in EXTRAPOLATION_FACTORS:
        end = min(factor * train_length, nll_sum.numel())
        if end <= start:
            break
        nll = (nll_sum[start:end].sum() / counts[start:end].sum()).item()
        ranges[f"{factor}x"] = {"start": start, "end": end, "nll": nll, "perplexity": math.exp(nll)}
        start = end
    return ranges


def plot(buckets: list[dict[str, Any]], train_length: int | None, title: str, path: Path) -> None:
    figure, axes = new_figure()
    axis = axes[0, 0]
    axis.plot([(b["start"] + b["end"]) / 2 for b in buckets], [b["perplexity"] for b in buckets], marker="o")
    if train_length is not None:
        for factor in EXTRAPOLATION_FACTORS:
            if factor * train_length <= buckets[-1]["end"]:
                axis.axvline(factor * train_length, color="grey", linestyle="--", linewidth=0.8)
                axis.text(factor * train_length, axis.get_ylim()[1], f"{factor}x", ha="center", va="bottom")
    axis.set_xlabel("position in sequence")
    axis.set_ylabel("perplexity")
    axis.set_yscale("log")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    save_figure(figure, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="implicit-lm eval perplexity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    add_data_arguments(parser, seq_len=2048)
    parser.add_argument("--bucket-size", type=int, help="positions per bucket (default: seq-len / 16)")
    parser.add_argument("--train-length", type=int, help="the model's training length, for the extrapolation ranges")
    parser.add_argument("--chunk-size", type=int, default=256, help="tokens per streamed chunk (sequential mode)")
    parser.add_argument("--output-dir", type=Path, default=Path("eval_results"))
    args = parser.parse_args(argv)
    check_positive(parser, args, "seq_len", "batch_size", "chunk_size", "bucket_size", "train_length", "max_sequences")
    return args


@run_cli
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, overrides=solver_overrides(args))
    mode = model.config.inference_mode if is_implicit(model) else "simultaneous"
    rows = load_rows(args, model, tokenizer)
    bucket_size = args.bucket_size or max(1, args.seq_len // 16)

    nll_sum = torch.zeros(args.seq_len - 1, dtype=torch.float64)
    counts = torch.zeros(args.seq_len - 1, dtype=torch.float64)
    start = time.perf_counter()
    with SolverStatsRecorder(model) as recorder:
        for batch in tqdm(rows.split(args.batch_size), desc=f"perplexity ({mode})", unit="batch"):
            batch = batch.to(args.device)
            if mode == "sequential":
                nll = streamed_nll(model, batch, args.chunk_size)
            else:
                nll = simultaneous_nll(model, batch)
            nll_sum += nll.double().sum(0).cpu()
            counts += nll.shape[0]
    elapsed = time.perf_counter() - start

    mean_nll = (nll_sum.sum() / counts.sum()).item()
    buckets = bucket_perplexities(nll_sum, counts, bucket_size)
    results = {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "bits_per_token": mean_nll / math.log(2),
        "tokens": int(counts.sum().item()),
        "sequences": rows.shape[0],
        "seq_len": args.seq_len,
        "inference_mode": mode,
        "buckets": buckets,
        "extrapolation": extrapolation_ranges(nll_sum, counts, args.train_length) if args.train_length else None,
        "solver_stats": recorder.summary() if is_implicit(model) else None,
        "seconds": elapsed,
        "tokens_per_second": counts.sum().item() / elapsed,
        "metadata": run_metadata(args, model),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.output_dir / "perplexity.json", results)
    plot(buckets, args.train_length, f"{Path(args.model).name} ({mode})", args.output_dir / "perplexity.png")
    summary = f"perplexity {results['perplexity']:.3f} over {results['tokens']} tokens ({mode} mode)"
    if results["extrapolation"]:
        summary += "; " + ", ".join(f"{k}: {v['perplexity']:.3f}" for k, v in results["extrapolation"].items())
    print(summary)
    return results


if __name__ == "__main__":
    main()
