"""Kernel dispatch: each operation picks, per call, the fastest implementation the tensors' device and the installed
packages allow, and falls back to the pure-PyTorch reference (`mamba2_ops`, `solver`) everywhere else.

| operation | CUDA, package installed | otherwise |
| --- | --- | --- |
| Mamba2 scan over a sequence (simultaneous) | mamba-ssm `mamba_chunk_scan_combined` | `mamba2_ops.ssd_chunk_scan` |
| Mamba2 conv over a sequence, zero state | causal-conv1d `causal_conv1d_fn` | `mamba2_ops.causal_conv1d_silu` |
| Mamba2 single-token step (sequential) | our Triton kernel | `mamba2_ops.mamba2_decode_step_reference` |
| the solver's Picard bookkeeping | our Triton kernel | `solver_ops.picard_update_reference` |

Llama attention goes through transformers' attention interface (`config._attn_implementation`: "eager", "sdpa",
"flash_attention_2"), so it needs no dispatch here. mamba-ssm's single-token kernels update states in place; an
implicit step must leave the committed state untouched across iterations, hence our own step kernel.

Each operation is a `Kernel`: the function callers see is the PyTorch reference (its signature, docstring and
results), and the fused implementations are registered against it with the condition under which they run, as
transformers' `use_kernel_func_from_hub_with_fallback` wraps its functions. Every CUDA-only import is guarded
(mamba-ssm raises more than ImportError when its extensions are missing), and the environment variable
`IMPLICIT_LM_KERNELS=torch` forces the PyTorch path (for comparisons and debugging).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

# `from .x import y` only: transformers' remote code copies the sibling files it finds in that form.
from .mamba2_ops import causal_conv1d_silu as causal_conv1d_silu_reference
from .mamba2_ops import mamba2_decode_step_reference
from .mamba2_ops import ssd_chunk_scan as ssd_chunk_scan_reference
from .solver_ops import SolveState, picard_update_reference

try:
    from .triton_kernels import mamba2_decode_step as mamba2_decode_step_triton
    from .triton_kernels import picard_update as picard_update_triton
except Exception:  # no triton (CPU-only installs, macOS)
    mamba2_decode_step_triton = picard_update_triton = None

try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except Exception:  # not installed, or installed without its CUDA extensions
    mamba_chunk_scan_combined = None

try:
    from causal_conv1d import causal_conv1d_fn
except Exception:
    causal_conv1d_fn = None


def kernels_enabled() -> bool:
    """False when `IMPLICIT_LM_KERNELS=torch` asks for the PyTorch path everywhere."""
    return os.environ.get("IMPLICIT_LM_KERNELS", "auto").lower() != "torch"


def _fast(tensor: torch.Tensor, implementation: object) -> bool:
    return implementation is not None and tensor.is_cuda and kernels_enabled()


def backends(device: torch.device | str) -> dict[str, str]:
    """Which implementation each operation uses for tensors on `device` (for logs, benchmarks and tests)."""
    probe = torch.empty(0, device=device)
    return {
        "ssd_chunk_scan": "mamba_ssm" if _fast(probe, mamba_chunk_scan_combined) else "torch",
        "causal_conv1d": "causal_conv1d" if _fast(probe, causal_conv1d_fn) else "torch",
        "mamba2_decode_step": "triton" if _fast(probe, mamba2_decode_step_triton) else "torch",
        "picard_update": "triton" if _fast(probe, picard_update_triton) else "torch",
    }


class Kernel:
    """One operation: its PyTorch `reference`, whose signature, docstring and results every implementation shares,
    and the fused implementations registered against it (`register`), each run when its condition holds for the
    call's arguments (the first that holds wins; otherwise the reference runs). `backend(*args)` names the one a call
    would run."""

    def __init__(self, reference: Callable[..., Any]):
        functools.update_wrapper(self, reference)  # callers (and `inspect.signature`) see the reference
        self.reference = reference
        self.implementations: list[tuple[str, Callable[..., bool], Callable[..., Any]]] = []

    def register(self, name: str, when: Callable[..., bool]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: `fn`, with the reference's signature, runs instead of it when `when(*args, **kwargs)`."""
        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.implementations.append((name, when, fn))
            return fn

        return decorate

    def _select(self, args: tuple, kwargs: dict) -> tuple[str, Callable[..., Any]]:
        for name, when, fn in self.implementations:
            if when(*args, **kwargs):
                return name, fn
        return "torch", self.reference

    def backend(self, *args: Any, **kwargs: Any) -> str:
        return self._select(args, kwargs)[0]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._select(args, kwargs)[1](*args, **kwargs)


ssd_chunk_scan = Kernel(ssd_chunk_scan_reference)
causal_conv1d_silu = Kernel(causal_conv1d_silu_reference)
mamba2_decode_step = Kernel(mamba2_decode_step_reference)
picard_update = Kernel(picard_update_reference)


@ssd_chunk_scan.register("mamba_ssm", when=lambda x, *args, **kwargs: _fast(x, mamba_chunk_scan_combined))
def _ssd_chunk_scan_mamba_ssm(x, dt, A, B, C, D, chunk_size, initial_state=None):
    y, final_state = mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state, return_final_states=True
    )
    return y.float(), final_state.float()


# causal-conv1d's initial-state path needs a channel-last layout: only sequences from a zero state go through it.
@causal_conv1d_silu.register("causal_conv1d", when=lambda x, weight, bias, state: state is None
                             and _fast(x, causal_conv1d_fn))
def _causal_conv1d_silu_library(x, weight, bias, state):
    width = weight.shape[-1]
    out = causal_conv1d_fn(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), activation="silu")
    new_state = torch.nn.functional.pad(x, (width - 1, 0))[..., -(width - 1):]
    return out, new_state


@mamba2_decode_step.register("triton", when=lambda xbc, *args, **kwargs: _fast(xbc, mamba2_decode_step_triton))
def _mamba2_decode_step_triton(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mamba2_decode_step_triton(*args, **kwargs)  # triton_kernels.mamba2_decode_step: the reference's signature


def fused_picard_update_available(z: torch.Tensor) -> bool:
    """Whether the solver's Picard update can run fused for `z` (CUDA, triton installed, contiguous)."""
    return _fast(z, picard_update_triton) and z.is_contiguous()


# Without a tape only: the kernel writes the state's tensors in place.
@picard_update.register("triton", when=lambda state, *args: not torch.is_grad_enabled()
                        and fused_picard_update_available(state.z))
def _picard_update_triton(state: SolveState, fz: torch.Tensor, damping: float, tolerance: float, stop_mode: str
                          ) -> SolveState:
    if state.out is None:  # the kernel writes z and out in place; z0 is the caller's (a warm start: the cache's)
        state = replace(state, z=state.z.clone(), out=fz.clone())
    return picard_update_triton(replace(state, step=state.step + 1), fz, damping, tolerance, stop_mode)
