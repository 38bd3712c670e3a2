"""How close implicit inference comes to its floor, measured side by side in one run (CPU or GPU).

    implicit-lm benchmark inference [--family mamba2] [--size 130m] [--device cpu] [--tolerance 1e-3]

An implicit token costs `iterations` evaluations of the layer stack; the floor is what the explicit model with the
same weights pays for that many evaluations. Implicit and explicit runs alternate in `--repeats` rounds after a
warm-up, and each keeps its fastest time (the least disturbed by other load). Reported:

- decode overhead = time per generated token / ((mean iterations + 1) x explicit single-token step), the explicit
  step being one cached forward of the explicit LM (`implicit=False`, same weights: embedding, stack, norm, head);
  strict decode overhead = time per generated token / (explicit step + (iterations - 1) x explicit stack-only step),
  where the stack-only step is the explicit backbone's cached forward (no head): every cost but the stack counted once.
  On CUDA, decoding is timed eager and with CUDA graphs (`cuda_graph_decoding`). With `--compile`, also with
  `compile_decoding` (and, on CUDA, both), against the explicit step compiled by `torch.compile` as the compiled
  floor; the compile time is the first compiled run's time beyond its steady cost. At batch > 1 also eager without
  setting converged rows aside (`skip_converged_rows=False`); `paid_per_needed` is the evaluations the batch paid per
  evaluation its rows needed.
- simultaneous overhead = implicit no-grad forward with exactly S iterations / (S x explicit forward), and strict:
  / (explicit forward + (S - 1) x explicit backbone forward). With `--compile`, also with `compile_simultaneous`
  (its speed-up over eager and its compile time).
- iterations per token at equal tolerance (sequential mode over a prompt): Picard, Anderson, warm start and both,
  with the share saved and the largest logit change against Picard; on the random model built here and, with
  `--model`, on trained ones (the bundled story model, say). A trained model need not be a contraction: two solvers
  can land on different fixed points, which the logit change shows.

Targets (issue 8): decode overhead <= 1.10 on CPU and <= 1.25 on GPU, simultaneous overhead <= 1.10, Anderson or
warm start >= 30% fewer iterations. `--json PATH` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from modeling_implicit import (
    ConvergenceWarning,
    ImplicitLlamaConfig,
    ImplicitLlamaForCausalLM,
    ImplicitMamba2Config,
    ImplicitMamba2ForCausalLM,
)
from modeling_implicit.compat import output_cache
from modeling_implicit.kernels import backends

# Model shapes: the reference's smallest (130M), a small one for quick runs, a tiny one for the tests.
SIZES = {
    "130m": dict(hidden_size=768, num_hidden_layers=24, vocab_size=50288),
    "small": dict(hidden_size=256, num_hidden_layers=4, vocab_size=4096),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, vocab_size=256),
}
SECTIONS = ("decode", "simultaneous", "iterations")
SOLVER_VARIANTS = (("picard", False), ("anderson", False), ("picard", True), ("anderson", True))


def build_models(family: str, size: str, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[Any, Any]:
    """A random implicit model and the explicit model with the same weights (`implicit=False`: no injection)."""
    shape = SIZES[size]
    torch.manual_seed(seed)
    if family == "mamba2":
        config = ImplicitMamba2Config(**shape, prefill_mode="sequential")
        model_class = ImplicitMamba2ForCausalLM
    else:
        config = ImplicitLlamaConfig(
            **shape, intermediate_size=4 * shape["hidden_size"], num_attention_heads=shape["hidden_size"] // 64,
            num_key_value_heads=shape["hidden_size"] // 64, max_position_embeddings=4096, prefill_mode="sequential",
        )
        model_class = ImplicitLlamaForCausalLM
    implicit = model_class(config).to(device=device, dtype=dtype).eval()
    explicit_config = type(config)(**{**config.to_dict(), "implicit": False})
    explicit = model_class(explicit_config).to(device=device, dtype=dtype).eval()
    missing, unexpected = explicit.load_state_dict(implicit.state_dict(), strict=False)
    if missing or any(not key.startswith("backbone.injection") and ".injection" not in key for key in unexpected):
        raise RuntimeError(f"explicit model does not share the weights: missing {missing}, unexpected {unexpected}")
    return implicit, explicit


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run: Callable[[], Any], device: str) -> float:
    """Wall time of `run()`, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - start


def best_of_rounds(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Each run (returning the seconds it measured) once as a warm-up, then `repeats` rounds of all of them in turn,
    keeping each one's fastest time. Interleaving exposes implicit and explicit runs to the same background load, and
    the fastest time is the least disturbed one (as `timeit` recommends)."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = min(best[name], run())
    return best


class Decoder:
    """Greedy decoding of `new_tokens` after a prefill of `prompt`; each call returns the seconds per generated
    token (the prefill not timed) and records the mean solver iterations per token in `iterations` (what the rows
    need) and the mean evaluations in `paid` (what the batch evaluated for them, `SolverStats.evaluations`: with
    `skip_converged_rows=False`, every row until the slowest converges). `overrides` are the solver settings of
    every call."""

    def __init__(self, model: Any, prompt: torch.Tensor, new_tokens: int, overrides: dict[str, Any] | None = None):
        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        self.overrides = overrides
        self.iterations: list[float] = []
        self.paid: list[float] = []

    @torch.no_grad()
    def __call__(self) -> float:
        output = self.model(self.prompt, use_cache=True, solver_overrides=self.overrides)
        cache = output_cache(output)
        first = output.logits[:, -1:].argmax(-1)
        per_token: list[torch.Tensor] = []
        paid: list[torch.Tensor] = []

        def run() -> None:
            token = first
            for _ in range(self.new_tokens):
                step = self.model(token, cache=cache, use_cache=True, solver_overrides=self.overrides)
                token = step.logits[:, -1:].argmax(-1)
                if step.solver_stats is not None:
                    per_token.append(step.solver_stats.iterations.float().mean())
                    paid.append(step.solver_stats.evaluations.float().mean())

        seconds = timed(run, str(self.prompt.device)) / self.new_tokens
        self.iterations.append(float(torch.stack(per_token).mean()) if per_token else 1.0)
        self.paid.append(float(torch.stack(paid).mean()) if paid else 1.0)
        return seconds


def step_runner(module: Any, prompt: torch.Tensor, steps: int = 4) -> Callable[[], float]:
    """A run timing one cached single-token forward of `module` (an explicit LM or backbone) after `prompt`, as the
    mean over `steps` forwards; the cache is kept at the prompt's length so every step costs the same."""
    with torch.no_grad():
        cache = output_cache(module(prompt, use_cache=True))
    token = prompt[:, -1:]
    seen = cache.get_seq_length()

    @torch.no_grad()
    def run() -> float:
        def forwards() -> None:
            for _ in range(steps):
                module(token, cache=cache, use_cache=True)
                if cache.is_croppable and cache.get_seq_length() > seen:
                    cache.crop(seen - cache.get_seq_length())

        return timed(forwards, str(prompt.device)) / steps

    return run


# Decode variants: name -> the solver overrides of its calls (`--compile` adds the compiled ones).
DECODE_VARIANTS = {"eager": {}, "eager_all_rows": dict(skip_converged_rows=False),
                   "cuda_graphs": dict(cuda_graph_decoding=True),
                   "compiled": dict(compile_decoding=True),
                   "compiled_cuda_graphs": dict(compile_decoding=True, cuda_graph_decoding=True)}


def decode_overhead(implicit: Any, explicit: Any, prompt: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    # A batch also without setting converged rows aside (`skip_converged_rows=False`), to show what that saves.
    names = ["eager"] + (["eager_all_rows"] if prompt.shape[0] > 1 else []) + (["cuda_graphs"] if prompt.is_cuda else [])
    if args.compile:
        names += ["compiled"] + (["compiled_cuda_graphs"] if prompt.is_cuda else [])
    decoders = {name: Decoder(implicit, prompt, args.new_tokens, DECODE_VARIANTS[name]) for name in names}
    runs: dict[str, Callable[[], float]] = {
        "explicit_step": step_runner(explicit, prompt),
        "explicit_stack_step": step_runner(explicit.base_model, prompt),
    }
    first_runs: dict[str, float] = {}
    if args.compile:
        runs["compiled_explicit_step"] = step_runner(torch.compile(explicit), prompt)
        runs["compiled_explicit_stack_step"] = step_runner(torch.compile(explicit.base_model), prompt)
        for name in names:
            if name.startswith("compiled"):  # the first run compiles (timed here, per token)
                first_runs[name] = _quietly(decoders[name])
    for name in names:
        runs[name] = partial(_quietly, decoders[name])
    best = best_of_rounds(runs, args.repeats)
    rows: dict[str, Any] = {"explicit_step_seconds": best["explicit_step"],
                            "explicit_stack_step_seconds": best["explicit_stack_step"]}
    if args.compile:
        rows["compiled_explicit_step_seconds"] = best["compiled_explicit_step"]
        rows["compiled_explicit_stack_step_seconds"] = best["compiled_explicit_stack_step"]
    for name in names:
        # Each variant against its own floor: compiled decoding against the compiled explicit step.
        floor = "compiled_explicit" if name.startswith("compiled") else "explicit"
        step, stack_step = best[f"{floor}_step"], best[f"{floor}_stack_step"]
        seconds = best[name]
        iterations = statistics.mean(decoders[name].iterations)
        rows[name] = {
            "seconds_per_token": seconds,
            "tokens_per_second": prompt.shape[0] / seconds,
            "mean_iterations": iterations,
            # evaluations the batch pays per token (its slowest row's iterations) per evaluation its rows need
            "paid_per_needed": statistics.mean(decoders[name].paid) / iterations,
            "decode_overhead": seconds / ((iterations + 1) * step),
            "strict_decode_overhead": seconds / (step + (iterations - 1) * stack_step),
        }
        if name in first_runs:
            rows[name]["compile_seconds"] = (first_runs[name] - seconds) * args.new_tokens
    return rows


def _quietly(run: Callable[[], float]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return run()


@torch.no_grad()
def simultaneous_overhead(implicit: Any, explicit: Any, tokens: torch.Tensor, args: argparse.Namespace) -> dict:
    device = str(tokens.device)
    runs: dict[str, Callable[[], float]] = {
        "explicit_forward": partial(timed, lambda: explicit(tokens, use_cache=False), device),
        "explicit_stack": partial(timed, lambda: explicit.base_model(tokens, use_cache=False), device),
    }
    compile_seconds = {}
    for iterations in args.simultaneous_iterations:
        overrides = dict(eval_max_iterations=iterations, early_stop=False, inference_mode="simultaneous")
        variants = {iterations: overrides}
        if args.compile:
            variants[f"compiled {iterations}"] = dict(overrides, compile_simultaneous=True)
        for name, variant in variants.items():
            forward = partial(timed, lambda variant=variant: implicit(tokens, use_cache=False,
                                                                      solver_overrides=variant), device)
            runs[name] = partial(_quietly, forward)
            if name != iterations:  # the first run compiles
                compile_seconds[iterations] = runs[name]()
    best = best_of_rounds(runs, args.repeats)
    explicit_forward, explicit_stack = best["explicit_forward"], best["explicit_stack"]
    rows = {}
    for iterations in args.simultaneous_iterations:
        seconds = best[iterations]
        rows[iterations] = {
            "seconds": seconds,
            "simultaneous_overhead": seconds / (iterations * explicit_forward),
            "strict_simultaneous_overhead": seconds / (explicit_forward + (iterations - 1) * explicit_stack),
        }
        if args.compile:
            compiled = best[f"compiled {iterations}"]
            rows[iterations].update(compiled_seconds=compiled, compiled_speedup=seconds / compiled,
                                    compile_seconds=compile_seconds[iterations] - compiled)
    return {"explicit_forward_seconds": explicit_forward, "explicit_stack_seconds": explicit_stack,
            "by_iterations": rows}


@torch.no_grad()
def iteration_savings(model: Any, tokens: torch.Tensor, tolerance: float, max_iterations: int) -> dict[str, Any]:
    """Mean iterations per token in sequential mode for each solver variant, at one tolerance."""
    rows, reference = {}, None
    for solver, warm_start in SOLVER_VARIANTS:
        overrides = dict(solver=solver, warm_start=warm_start, tolerance=tolerance,
                         eval_max_iterations=max_iterations, inference_mode="sequential")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            output = model(tokens, use_cache=False, solver_overrides=overrides)
        stats = output.solver_stats
        if reference is None:
            reference = output
        name = solver + (" + warm start" if warm_start else "")
        rows[name] = {
            "mean_iterations": float(stats.iterations.float().mean()),
            "converged": float(stats.converged.float().mean()),
            "max_logit_change": float((output.logits - reference.logits).abs().max()),
        }
    base = rows["picard"]["mean_iterations"]
    for row in rows.values():
        row["saved"] = 1 - row["mean_iterations"] / base
    return rows


def load_trained(path: str, device: str) -> tuple[Any, torch.Tensor]:
    """A trained model folder and a sample of its own training distribution (story text for the story model, random
    ids otherwise)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).to(device).eval()
    tokens = None
    if (Path(path) / "stories.json").is_file():
        from implicit_lm.tasks.stories import generate_stories

        tokenizer = AutoTokenizer.from_pretrained(path)
        texts = [story.text() for story in generate_stories(4, 8, 8, seed=7)]
        tokens = tokenizer(texts, return_tensors="pt", padding=True).input_ids[:, :48].to(device)
    if tokens is None:
        tokens = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
        tokens = tokens.to(device)
    return model, tokens


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['family']} {report['size']} on {report['device_name']} ({report['dtype']}, batch "
             f"{report['batch']}, tolerance {report['tolerance']}); kernels: {report['kernels']}"]
    decode = report.get("decode", {})
    if decode:
        lines.append(f"explicit single-token step {decode['explicit_step_seconds'] * 1e3:.2f} ms, stack only "
                     f"{decode['explicit_stack_step_seconds'] * 1e3:.2f} ms")
    if "compiled_explicit_step_seconds" in decode:
        lines.append(f"compiled explicit single-token step {decode['compiled_explicit_step_seconds'] * 1e3:.2f} ms, "
                     f"stack only {decode['compiled_explicit_stack_step_seconds'] * 1e3:.2f} ms")
    for name in DECODE_VARIANTS:
        if name in decode:
            row = decode[name]
            if "compile_seconds" in row:
                lines.append(f"{name}: compiled in {row['compile_seconds']:.1f} s (first run beyond its steady cost)")
            lines.append(f"decode ({name}): {row['seconds_per_token'] * 1e3:.1f} ms/token, "
                         f"{row['tokens_per_second']:.2f} tokens/s, {row['mean_iterations']:.2f} iterations/token "
                         f"(paid {row['paid_per_needed']:.3f}x); "
                         f"decode overhead {row['decode_overhead']:.3f} (target <= 1.10 CPU, 1.25 GPU), strict "
                         f"{row['strict_decode_overhead']:.3f}")
    simultaneous = report.get("simultaneous", {"by_iterations": {}})
    for iterations, row in simultaneous["by_iterations"].items():
        lines.append(f"simultaneous, S={iterations}: {row['seconds'] * 1e3:.1f} ms; overhead "
                     f"{row['simultaneous_overhead']:.3f} (target <= 1.10), strict "
                     f"{row['strict_simultaneous_overhead']:.3f}")
        if "compiled_seconds" in row:
            lines.append(f"simultaneous compiled (compile_simultaneous), S={iterations}: "
                         f"{row['compiled_seconds'] * 1e3:.1f} ms, {row['compiled_speedup']:.2f}x eager, compiled in "
                         f"{row['compile_seconds']:.1f} s")
    for label, rows in report.get("iterations", {}).items():
        lines.append(f"iterations per token at tolerance {report['tolerance']} ({label}):")
        for name, row in rows.items():
            lines.append(f"  {name:<22} {row['mean_iterations']:6.2f}  saved {row['saved']:+.0%}  converged "
                         f"{row['converged']:.1%}  max logit change {row['max_logit_change']:.2e}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="implicit-lm benchmark inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("mamba2", "llama"), default="mamba2")
    parser.add_argument("--size", choices=tuple(SIZES), default="130m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=1e-3, help="solver tolerance of every implicit run")
    parser.add_argument("--simultaneous-iterations", type=int, nargs="+", default=[8])
    parser.add_argument("--convergence-check-interval", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up")
    parser.add_argument("--model", action="append", default=[], help="trained model folder for the iteration table")
    parser.add_argument("--sections", default="decode,simultaneous,iterations",
                        help="comma-separated subset of decode, simultaneous, iterations")
    parser.add_argument("--compile", action="store_true",
                        help="also time compile_decoding, against the explicit step compiled by torch.compile, and "
                             "compile_simultaneous against eager simultaneous mode")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    for name in ("batch", "prompt_length", "new_tokens", "repeats", "convergence_check_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.tolerance <= 0:
        parser.error("--tolerance must be > 0")
    args.sections = args.sections.split(",")
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    implicit, explicit = build_models(args.family, args.size, args.device, dtype)
    implicit.config.update(dict(tolerance=args.tolerance, eval_max_iterations=200,
                                convergence_check_interval=args.convergence_check_interval))
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, implicit.config.vocab_size, (args.batch, args.prompt_length), generator=generator)
    prompt = prompt.to(args.device)
    report: dict[str, Any] = {
        "family": args.family,
        "size": args.size,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch": args.batch,
        "tolerance": args.tolerance,
        "kernels": backends(args.device),
        "date": time.strftime("%Y-%m-%d"),
    }
    if "decode" in args.sections:
        report["decode"] = decode_overhead(implicit, explicit, prompt, args)
    if "simultaneous" in args.sections:
        report["simultaneous"] = simultaneous_overhead(implicit, explicit, prompt, args)
    if "iterations" in args.sections:
        report["iterations"] = {f"random {args.size}": iteration_savings(implicit, prompt, args.tolerance, 200)}
        for path in args.model:
            model, tokens = load_trained(path, args.device)
            report["iterations"][Path(path).name] = iteration_savings(model, tokens, args.tolerance, 200)
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
