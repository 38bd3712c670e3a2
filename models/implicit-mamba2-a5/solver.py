"""Fixed-point solver shared by every implicit model: forward iteration, Anderson acceleration, phantom gradients.

The solver knows nothing about the model. It iterates a function `fn(z) -> (f(z), aux)` where `z` has the batch in
dimension 0 and `aux` is a tuple of tensors (batch in dimension 0 too, e.g. the recurrent states computed while
evaluating `f`) or `None`. Convergence is judged per sample and converged samples are frozen, so a sample's result
never depends on its batch mates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .numerics import at_least_float32

FixedPointFunction = Callable[[torch.Tensor], tuple[torch.Tensor, Any]]

# Added to ||z|| in the relative residual; keeps an all-zero sample (pure padding, f(0) = 0) at residual 0.
_NORM_EPS = 1e-8
# Tikhonov regularisation of Anderson's least-squares system, relative to the mean squared residual.
_ANDERSON_REG = 1e-4


class SolverDivergenceError(FloatingPointError):
    """Raised when the fixed-point residual of a sample becomes NaN or infinite."""


@dataclass
class SolverSettings:
    """The solver fields of an `ImplicitPretrainedConfig`, resolved for one call (the iteration cap depends on
    whether the model is training)."""

    max_iterations: int
    tolerance: float
    stop_mode: str
    damping: float
    solver: str
    anderson_memory: int
    phantom_steps: int
    phantom_damping: float
    backward: str

    @classmethod
    def from_config(cls, config: Any, training: bool) -> SolverSettings:
        return cls(
            max_iterations=config.max_iterations if training else config.eval_max_iterations,
            tolerance=float(config.tolerance),
            stop_mode=config.stop_mode,
            damping=float(config.damping),
            solver=config.solver,
            anderson_memory=config.anderson_memory,
            phantom_steps=config.phantom_steps,
            phantom_damping=float(config.phantom_damping),
            backward=config.backward,
        )


@dataclass
class SolverStats:
    """Per-sample statistics of a fixed-point solve.

    Shapes are `(batch,)` for one solve per sample (simultaneous mode) and `(batch, seq_len)` for one solve per token
    (sequential mode).

    Attributes:
        iterations: evaluations of `f` until the sample converged or hit the cap.
        residual: the residual (see `ImplicitPretrainedConfig.stop_mode`) at the last iteration, float32.
        converged: whether the residual fell below the tolerance.
    """

    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor

    @classmethod
    def stack(cls, per_token: list[SolverStats]) -> SolverStats:
        """Join the `(batch,)` stats of consecutive token solves into `(batch, seq_len)` stats."""
        return cls(
            iterations=torch.stack([s.iterations for s in per_token], dim=1),
            residual=torch.stack([s.residual for s in per_token], dim=1),
            converged=torch.stack([s.converged for s in per_token], dim=1),
        )


@dataclass
class FixedPointResult:
    """`z` is `f` evaluated at the last iterate of each sample (or the phantom-step output when training), `aux` the
    auxiliary outputs of that same evaluation."""

    z: torch.Tensor
    aux: Any
    stats: SolverStats


def _batch_where(mask: torch.Tensor, new: Any, old: Any) -> Any:
    """Select `new` where `mask` (per sample) is set, else `old`; works on tensors and (nested) tuples of them."""
    if old is None:
        return new
    if isinstance(new, torch.Tensor):
        return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)
    if new is None:
        return None
    return type(new)(_batch_where(mask, n, o) for n, o in zip(new, old))


def _residual(fz: torch.Tensor, z: torch.Tensor, stop_mode: str) -> torch.Tensor:
    fz, z = at_least_float32(fz), at_least_float32(z)
    diff = (fz - z).flatten(1).norm(dim=1)
    if stop_mode == "abs":
        return diff
    return diff / (z.flatten(1).norm(dim=1) + _NORM_EPS)


class _Anderson:
    """Anderson acceleration (type II, Walker & Ni) with a ring buffer of the last `memory` iterates per sample."""

    def __init__(self, memory: int, damping: float):
        self.memory = memory
        self.damping = damping
        self.xs: torch.Tensor | None = None
        self.fs: torch.Tensor | None = None
        self.count = 0

    def step(self, z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
        batch = z.shape[0]
        dtype = torch.promote_types(z.dtype, torch.float32)  # at least float32 for the least-squares system
        x, f = z.to(dtype).reshape(batch, -1), fz.to(dtype).reshape(batch, -1)
        if self.xs is None:
            self.xs = x.new_zeros(batch, self.memory, x.shape[1])
            self.fs = x.new_zeros(batch, self.memory, x.shape[1])
        slot = self.count % self.memory
        if x.requires_grad:  # an unrolled backward needs the earlier buffers intact: write into copies
            self.xs, self.fs = self.xs.clone(), self.fs.clone()
        self.xs[:, slot] = x
        self.fs[:, slot] = f
        self.count += 1
        n = min(self.count, self.memory)
        if n == 1:
            return ((1 - self.damping) * z + self.damping * fz).to(z.dtype)
        xs, fs = self.xs[:, :n], self.fs[:, :n]
        g = fs - xs
        system = x.new_zeros(batch, n + 1, n + 1)
        system[:, 0, 1:] = 1
        system[:, 1:, 0] = 1
        gram = g @ g.transpose(1, 2)
        # Regularise relative to the residuals' scale: an absolute term would swamp the system near convergence.
        scale = gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(gram.dtype).tiny)
        system[:, 1:, 1:] = gram + _ANDERSON_REG * scale[:, None, None] * torch.eye(n, device=x.device, dtype=x.dtype)
        rhs = x.new_zeros(batch, n + 1, 1)
        rhs[:, 0] = 1
        alpha = torch.linalg.solve(system, rhs)[:, 1:, 0]
        mixed = self.damping * (alpha[:, None] @ fs)[:, 0] + (1 - self.damping) * (alpha[:, None] @ xs)[:, 0]
        return mixed.reshape(z.shape).to(z.dtype)


def _iterate(fn: FixedPointFunction, z0: torch.Tensor, settings: SolverSettings) -> FixedPointResult:
    batch = z0.shape[0]
    device = z0.device
    z = z0
    active = torch.ones(batch, dtype=torch.bool, device=device)
    iterations = torch.zeros(batch, dtype=torch.long, device=device)
    residual = torch.full((batch,), float("inf"), device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    out: torch.Tensor | None = None
    aux: Any = None
    anderson = _Anderson(settings.anderson_memory, settings.damping) if settings.solver == "anderson" else None

    for step in range(1, settings.max_iterations + 1):
        fz, step_aux = fn(z)
        res = _residual(fz, z, settings.stop_mode)
        bad = active & ~torch.isfinite(res)
        iterations = torch.where(active, step, iterations)
        residual = torch.where(active, res, residual)
        out = _batch_where(active, fz, out)
        aux = _batch_where(active, step_aux, aux)
        newly_converged = active & (res < settings.tolerance)
        converged = converged | newly_converged
        active = active & ~newly_converged
        # One host synchronisation per iteration: the divergence check and the early exit share it.
        any_bad, any_active = torch.stack([bad.any(), active.any()]).tolist()
        if any_bad:
            samples = bad.nonzero().flatten().tolist()
            raise SolverDivergenceError(
                f"Fixed-point solver diverged: the residual of batch sample(s) {samples} is NaN or infinite at "
                f"iteration {step}. Try a smaller `damping`, `solver='anderson'`, or check the inputs and weights."
            )
        if not any_active or step == settings.max_iterations:
            break
        z_next = anderson.step(z, fz) if anderson is not None else (1 - settings.damping) * z + settings.damping * fz
        z = _batch_where(active, z_next, z)

    return FixedPointResult(out, aux, SolverStats(iterations, residual, converged))


def solve_fixed_point(fn: FixedPointFunction, z0: torch.Tensor, settings: SolverSettings) -> FixedPointResult:
    """Find `z* = f(z*)` per sample and attach the gradient the settings ask for.

    - No gradient needed (`torch.is_grad_enabled()` is False): a tape-free solve.
    - `backward="phantom"`: a tape-free solve, then `phantom_steps` damped steps with tape starting from the detached
      solution (eq. 5 of the paper); memory does not depend on the number of solver iterations.
    - `backward="unrolled"`: autograd through every iteration of the solve.
    """
    if not torch.is_grad_enabled() or settings.backward == "unrolled":
        return _iterate(fn, z0, settings)
    with torch.no_grad():
        solved = _iterate(fn, z0, settings)
    z = solved.z.detach()
    aux = None
    for _ in range(settings.phantom_steps):
        fz, aux = fn(z)
        z = (1 - settings.phantom_damping) * z + settings.phantom_damping * fz
    return FixedPointResult(z, aux, solved.stats)
