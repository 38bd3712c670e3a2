"""Memory of phantom-gradient training does not grow with the number of tape-free solver iterations.

    OMP_NUM_THREADS=1 implicit-lm benchmark phantom-memory [--iterations 4 8 16 32] [--phantom-steps 4]

For a small random implicit Mamba2 and Llama in training mode, one forward (loss included) is run with exactly `s`
solver iterations (`max_iterations=s` and a tolerance no residual falls below) for each `s`, with `backward="phantom"`
(`k` phantom steps) and with `backward="unrolled"` (autograd through all `s` iterations). Reported per run:

- saved: the bytes of the tensors autograd keeps for the backward pass, counted exactly with
  `torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters excluded. Deterministic.
- peak RSS: the growth of the process's resident set over forward + backward (Linux: the peak is reset through
  `/proc/self/clear_refs` and free heap memory is returned with `malloc_trim` first; `-` elsewhere). Approximate: it
  includes the solve's temporaries, the gradients and allocator slack.

Phantom gradients keep `saved` constant in `s` (ratio 1.00); the unrolled baseline grows about linearly (ratio near
`32 / 4 = 8`, less the parts of the graph outside the solve: embedding, injection, head and loss).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from modeling_implicit import (
    ConvergenceWarning,
    ImplicitLlamaConfig,
    ImplicitLlamaForCausalLM,
    ImplicitMamba2Config,
    ImplicitMamba2ForCausalLM,
)

FAMILIES = ("mamba2", "llama")
BACKWARDS = ("phantom", "unrolled")


@dataclass(frozen=True)
class Measurement:
    """One forward + backward. Bytes; `peak_rss_bytes` is None where it cannot be measured."""

    family: str
    backward: str
    iterations: int
    phantom_steps: int
    saved_bytes: int
    peak_rss_bytes: int | None


def build_model(family: str, hidden_size: int, num_layers: int, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A random implicit model of `family` with the Picard solver, in training mode."""
    shared = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, solver="picard")
    torch.manual_seed(seed)
    if family == "mamba2":
        head_dim = min(16, hidden_size)
        config = ImplicitMamba2Config(state_size=16, head_dim=head_dim, n_groups=1, chunk_size=32, **shared)
        model = ImplicitMamba2ForCausalLM(config)
    elif family == "llama":
        config = ImplicitLlamaConfig(
            intermediate_size=2 * hidden_size, num_attention_heads=4, num_key_value_heads=2, **shared
        )
        model = ImplicitLlamaForCausalLM(config)
    else:
        raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES}.")
    return model.train()


class _SavedTensorCounter:
    """Counts the bytes of every storage autograd saves for backward, each once, ignoring the given storages."""

    def __init__(self, ignored_pointers: set[int]):
        self.ignored = ignored_pointers
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.ignored:
            self.storages[pointer] = max(self.storages.get(pointer, 0), storage.nbytes())
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class _PeakRss:
    """Growth of the resident set between `start()` and `peak()`, from Linux's `VmHWM`; None elsewhere."""

    def __init__(self) -> None:
        self.available = Path("/proc/self/clear_refs").exists()
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:  # not glibc: freed memory stays resident, the numbers would mean little
            self.available = False

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def start(self) -> None:
        if not self.available:
            return
        gc.collect()
        self._trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self.baseline = self._status("VmRSS")

    def peak(self) -> int | None:
        return self._status("VmHWM") - self.baseline if self.available else None


def measure_run(
    model: torch.nn.Module, input_ids: torch.Tensor, iterations: int, phantom_steps: int, backward: str
) -> tuple[int, int | None]:
    """Saved-for-backward bytes and peak RSS growth of one forward + backward with exactly `iterations` iterations."""
    overrides = dict(max_iterations=iterations, early_stop=False, phantom_steps=phantom_steps, backward=backward)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counter = _SavedTensorCounter(parameters)
    rss = _PeakRss()
    model.zero_grad(set_to_none=True)
    rss.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # stopping at the cap is the point
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            outputs = model(input_ids=input_ids, labels=input_ids, use_cache=False, solver_overrides=overrides)
        outputs.loss.backward()
    peak = rss.peak()
    done = outputs.solver_stats.iterations
    if not bool((done == iterations).all()):
        raise RuntimeError(f"expected exactly {iterations} solver iterations, got {done.tolist()}")
    model.zero_grad(set_to_none=True)
    return counter.total, peak


def measure(
    families: tuple[str, ...] = FAMILIES,
    iterations: tuple[int, ...] = (4, 8, 16, 32),
    phantom_steps: int = 4,
    batch_size: int = 2,
    seq_len: int = 128,
    hidden_size: int = 128,
    num_layers: int = 2,
    vocab_size: int = 256,
) -> list[Measurement]:
    """Measure every family x backward x iteration count (see the module docstring)."""
    results = []
    for family in families:
        model = build_model(family, hidden_size, num_layers, vocab_size)
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(vocab_size, (batch_size, seq_len), generator=generator)
        # Warm-up: first calls allocate lasting buffers (thread pools, kernel caches) the peak RSS should not count.
        measure_run(model, input_ids, min(iterations), phantom_steps, "phantom")
        for backward in BACKWARDS:
            for count in iterations:
                saved, peak = measure_run(model, input_ids, count, phantom_steps, backward)
                results.append(Measurement(family, backward, count, phantom_steps, saved, peak))
    return results


def growth(results: list[Measurement], family: str, backward: str, field: str = "saved_bytes") -> float | None:
    """`field` (`"saved_bytes"` or `"peak_rss_bytes"`) at the largest iteration count / at the smallest, for one
    family and backward; None when not measured."""
    rows = sorted((r for r in results if r.family == family and r.backward == backward), key=lambda r: r.iterations)
    low, high = getattr(rows[0], field), getattr(rows[-1], field)
    return None if low is None or high is None else high / low


def main(argv: list[str] | None = None) -> list[Measurement]:
    parser = argparse.ArgumentParser(
        prog="implicit-lm benchmark phantom-memory", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--iterations", type=int, nargs="+", default=[4, 8, 16, 32], help="tape-free iterations s")
    parser.add_argument("--phantom-steps", type=int, default=4, help="phantom steps k (default 4)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    args = parser.parse_args(argv)
    results = measure(
        iterations=tuple(args.iterations),
        phantom_steps=args.phantom_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
    )
    mib = 2**20
    print(f"batch {args.batch_size} x {args.seq_len} tokens, hidden {args.hidden_size}, {args.num_layers} layers, "
          f"k = {args.phantom_steps} phantom steps, float32, torch {torch.__version__}")
    print(f"{'family':<8} {'backward':<9} {'s':>3} {'saved MiB':>10} {'peak RSS MiB':>13}")
    for r in results:
        rss = "-" if r.peak_rss_bytes is None else f"{r.peak_rss_bytes / mib:.1f}"
        print(f"{r.family:<8} {r.backward:<9} {r.iterations:>3} {r.saved_bytes / mib:>10.2f} {rss:>13}")
    low, high = min(args.iterations), max(args.iterations)
    for family in FAMILIES:
        print(f"{family}: saved(s={high}) / saved(s={low}) = {growth(results, family, 'phantom'):.2f} phantom "
              f"(target 1.00), {growth(results, family, 'unrolled'):.2f} unrolled")
        rss = [growth(results, family, backward, "peak_rss_bytes") for backward in BACKWARDS]
        if None not in rss:
            print(f"{family}: peak RSS(s={high}) / peak RSS(s={low}) = {rss[0]:.2f} phantom, {rss[1]:.2f} unrolled")
    return results


if __name__ == "__main__":
    main()
