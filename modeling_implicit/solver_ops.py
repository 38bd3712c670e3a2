"""The solver's tensor operations in plain PyTorch: its results and statistics, the per-sample state one solve
carries, and the Picard bookkeeping step (`picard_update_reference`, the reference of the fused kernel that
`kernels.picard_update` dispatches to). Model-free, like `mamba2_ops` for the Mamba2 kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from .numerics import NORM_EPS, at_least_float32

FixedPointFunction = Callable[[torch.Tensor], tuple[torch.Tensor, Any]]


class SolverDivergenceError(FloatingPointError):
    """Raised when the fixed-point residual of a sample becomes NaN or infinite."""


@dataclass
class SolverStats:
    """Per-sample statistics of a fixed-point solve.

    Shapes are `(batch,)` for one solve per sample (simultaneous mode) and `(batch, seq_len)` for one solve per token
    (sequential mode).

    Attributes:
        iterations: evaluations of `f` until the sample converged or hit the cap.
        residual: the residual (see `ImplicitPreTrainedConfig.stop_mode`) at the last iteration, float32.
        converged: whether the residual fell below the tolerance.
        evaluations: evaluations of `f` computed for the sample, its `iterations` plus those its batch paid for it
            after it stopped (a batch without `skip_converged_rows`, the rest of a `convergence_check_interval`, a
            reference loop's coupled batch; None where a caller built the statistics without it).
    """

    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    evaluations: torch.Tensor | None = None

    @classmethod
    def stack(cls, per_token: list[SolverStats]) -> SolverStats:
        """Join the `(batch,)` stats of consecutive token solves into `(batch, seq_len)` stats."""
        evaluations = [s.evaluations for s in per_token]
        return cls(
            iterations=torch.stack([s.iterations for s in per_token], dim=1),
            residual=torch.stack([s.residual for s in per_token], dim=1),
            converged=torch.stack([s.converged for s in per_token], dim=1),
            evaluations=None if any(e is None for e in evaluations) else torch.stack(evaluations, dim=1),
        )


@dataclass
class FixedPointResult:
    """`z` is `f` evaluated at the last iterate of each sample (or the phantom-step output when training), `aux` the
    auxiliary outputs of that same evaluation."""

    z: torch.Tensor
    aux: Any
    stats: SolverStats


def batch_where(mask: torch.Tensor, new: Any, old: Any) -> Any:
    """Select `new` where `mask` (per sample) is set, else `old`; works on tensors and (nested) tuples of them."""
    if old is None:
        return new
    if isinstance(new, torch.Tensor):
        return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)
    if new is None:
        return None
    return type(new)(batch_where(mask, n, o) for n, o in zip(new, old))


def residual_norm(fz: torch.Tensor, z: torch.Tensor, stop_mode: str) -> torch.Tensor:
    """Per-sample residual `||f(z) - z||` (`"abs"`) or `||f(z) - z|| / (||z|| + eps)` (`"rel"`), in float32."""
    fz, z = at_least_float32(fz), at_least_float32(z)
    diff = (fz - z).flatten(1).norm(dim=1)
    if stop_mode == "abs":
        return diff
    return diff / (z.flatten(1).norm(dim=1) + NORM_EPS)


@dataclass
class SolveState:
    """Everything the iteration carries from one step to the next, on the device (batch in dimension 0).

    `z` is the next iterate, `out`/`aux` the evaluation of `f` at each sample's last active iterate, `active` the
    samples still iterating, `diverged_at` the first iteration whose residual was NaN/inf (0: none) and `step` the
    number of iterations run (a 0-dim tensor, so that a captured CUDA graph can advance it). `rows` are the rows of
    the solve's batch the state holds, once the rows that stopped were set aside (None: all of them, in order).

    An update (`picard_update`, `solver_iteration`) takes a state and returns the next one, and the state it took is
    spent: the PyTorch reference builds new tensors (what autograd needs), the fused kernel, used only without a tape,
    writes the tensors of the state it is given and returns them. No caller uses a state after passing it on.
    """

    z: torch.Tensor
    out: torch.Tensor | None
    aux: Any
    active: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    diverged_at: torch.Tensor
    step: torch.Tensor
    rows: torch.Tensor | None = None

    @classmethod
    def start(cls, z0: torch.Tensor) -> SolveState:
        batch, device = z0.shape[0], z0.device
        return cls(
            z=z0,
            out=None,
            aux=None,
            active=torch.ones(batch, dtype=torch.bool, device=device),
            iterations=torch.zeros(batch, dtype=torch.long, device=device),
            residual=torch.full((batch,), float("inf"), device=device),
            converged=torch.zeros(batch, dtype=torch.bool, device=device),
            diverged_at=torch.zeros(batch, dtype=torch.long, device=device),
            step=torch.zeros((), dtype=torch.long, device=device),
        )

    def stats(self) -> SolverStats:
        return SolverStats(self.iterations, self.residual, self.converged)


def picard_update_reference(
    state: SolveState, fz: torch.Tensor, damping: float, tolerance: float, stop_mode: str
) -> SolveState:
    """One Picard bookkeeping step in plain PyTorch, functional (safe under autograd): residuals, `out`, statistics
    and masks of the samples active before this step, and the damped update `z + damping (f(z) - z)` of those
    samples. `picard_update` is this function; the fused kernel registered on it (`triton_kernels.picard_update`)
    does the same in one pass and is tested against this."""
    compute = torch.promote_types(state.z.dtype, torch.float32)
    damped = ((1 - damping) * state.z.to(compute) + damping * fz.to(compute)).to(state.z.dtype)
    return advance(state, fz, damped, tolerance, stop_mode)


def advance(
    state: SolveState, fz: torch.Tensor, candidate: torch.Tensor, tolerance: float, stop_mode: str
) -> SolveState:
    """The bookkeeping every update shares: residuals, `out`, statistics and masks of the samples active before this
    step; those samples move to `candidate` (the damped or Anderson update), the others keep their iterate."""
    step = state.step + 1
    res = residual_norm(fz, state.z, stop_mode)
    active = state.active
    bad = active & ~torch.isfinite(res)
    newly_converged = active & (res < tolerance)
    return replace(
        state,
        z=torch.where(active.view(-1, *([1] * (fz.dim() - 1))), candidate, state.z),
        out=fz if state.out is None else batch_where(active, fz, state.out),
        iterations=torch.where(active, step, state.iterations),
        residual=torch.where(active, res, state.residual),
        converged=state.converged | newly_converged,
        active=active & ~newly_converged,
        diverged_at=torch.where(bad & (state.diverged_at == 0), step, state.diverged_at),
        step=step,
    )
