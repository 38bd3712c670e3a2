"""Kernel dispatch: each operation picks, per call, the fastest implementation the tensors' device and the installed
packages allow, and falls back to the pure-PyTorch reference (`mamba2_ops`, `solver`) everywhere else.

| operation | CUDA, package installed | otherwise |
| --- | --- | --- |
| Mamba2 scan over a sequence (simultaneous) | mamba-ssm `mamba_chunk_scan_combined` | `mamba2_ops.ssd_chunk_scan` |
| Mamba2 conv over a sequence, zero state | causal-conv1d `causal_conv1d_fn` | `mamba2_ops.causal_conv1d_silu` |
| Mamba2 single-token step (sequential) | our Triton kernel | `mamba2_ops.mamba2_decode_step_reference` |
| the solver's Picard bookkeeping | our Triton kernel | `solver.picard_update_reference` |

Llama attention goes through transformers' attention interface (`config._attn_implementation`: "eager", "sdpa",
"flash_attention_2"), so it needs no dispatch here. mamba-ssm's single-token kernels update states in place; an
implicit step must leave the committed state untouched across iterations, hence our own step kernel.

Every CUDA-only import is guarded (mamba-ssm raises more than ImportError when its extensions are missing), and the
environment variable `IMPLICIT_LM_KERNELS=torch` forces the PyTorch path (for comparisons and debugging).
"""

from __future__ import annotations

import os
from typing import Any

import torch

# `from .x import y` only: transformers' remote code copies the sibling files it finds in that form.
from .mamba2_ops import causal_conv1d_silu as causal_conv1d_silu_reference
from .mamba2_ops import mamba2_decode_step_reference
from .mamba2_ops import ssd_chunk_scan as ssd_chunk_scan_reference

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


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mamba2_ops.ssd_chunk_scan` (same arguments and results), through mamba-ssm on CUDA when installed."""
    if not _fast(x, mamba_chunk_scan_combined):
        return ssd_chunk_scan_reference(x, dt, A, B, C, D, chunk_size, initial_state)
    y, final_state = mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state, return_final_states=True
    )
    return y.float(), final_state.float()


def causal_conv1d_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mamba2_ops.causal_conv1d_silu` (same arguments and results), through causal-conv1d on CUDA when installed and
    the sequence starts from a zero state (its initial-state path needs a channel-last layout)."""
    if state is not None or not _fast(x, causal_conv1d_fn):
        return causal_conv1d_silu_reference(x, weight, bias, state)
    width = weight.shape[-1]
    out = causal_conv1d_fn(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), activation="silu")
    new_state = torch.nn.functional.pad(x, (width - 1, 0))[..., -(width - 1):]
    return out, new_state


def mamba2_decode_step(xbc: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mamba2_ops.mamba2_decode_step_reference` (same arguments, by keyword, and results), fused in one Triton kernel
    on CUDA."""
    if _fast(xbc, mamba2_decode_step_triton):
        return mamba2_decode_step_triton(xbc, **kwargs)
    return mamba2_decode_step_reference(xbc, **kwargs)


def fused_picard_update_available(z: torch.Tensor) -> bool:
    """Whether `picard_update` runs fused for `z` (CUDA, triton installed, contiguous)."""
    return _fast(z, picard_update_triton) and z.is_contiguous()


def picard_update(
    z: torch.Tensor,
    fz: torch.Tensor,
    out: torch.Tensor,
    active: torch.Tensor,
    iterations: torch.Tensor,
    residual: torch.Tensor,
    converged: torch.Tensor,
    diverged_at: torch.Tensor,
    step: torch.Tensor,
    damping: float,
    tolerance: float,
    relative: bool,
    norm_eps: float,
) -> None:
    """The solver's fused Picard bookkeeping, in place (see `triton_kernels.picard_update`). Only call it when
    `fused_picard_update_available(z)`; the solver's functional `picard_update_reference` is the fallback."""
    picard_update_triton(
        z, fz.contiguous(), out, active, iterations, residual, converged, diverged_at, step,
        damping, tolerance, relative, norm_eps,
    )
