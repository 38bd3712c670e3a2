"""The reference codebases' own inference loops (`ImplicitPreTrainedConfig.inference_loop`), reproduced for checking
their numbers with a converted checkpoint. Both couple the rows of a batch (a sample's result depends on its batch
mates) and run damped fixed-point iteration whatever `solver` says; training never uses them. `solver.LOOPS` holds
them beside our per-sample loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .numerics import at_least_float32
from .solver_ops import FixedPointFunction, FixedPointResult, SolverDivergenceError, SolverStats, batch_where

if TYPE_CHECKING:
    from .solver import SolverSettings

# The references' epsilons: added to ||z|| (global loop) and to ||f|| (best-per-sample loop).
_GLOBAL_EPS = 1e-6
_BEST_EPS = 1e-9


def iterate_global_then_undamped(fn: FixedPointFunction, z0: torch.Tensor, settings: SolverSettings) -> FixedPointResult:
    """The reference inference loop of microsoft/implicit_languagemodels (and the standalone code's sequential step):
    at most `max_iterations - 1` damped iterations `z <- (1 - damping) z + damping f(z)`, each followed by the test
    `||f(z) - z|| / (1e-6 + ||z||) < tolerance` with one norm over the whole batch (the rows are coupled: a batch
    stops together), then one undamped evaluation whose output and `aux` are the result. Iterations count the damped
    ones, as the reference's `steps` (one more evaluation of `f` follows)."""
    z, residual, steps = z0, torch.tensor(float("inf"), device=z0.device), 0
    for step in range(settings.max_iterations - 1):
        fz, _ = fn(z)
        difference = (at_least_float32(fz) - at_least_float32(z)).norm()
        residual = difference / (_GLOBAL_EPS + at_least_float32(z).norm())
        z = ((1 - settings.damping) * z + settings.damping * fz).to(z.dtype)
        steps = step + 1
        if not torch.isfinite(residual):
            raise SolverDivergenceError(
                f"Fixed-point solver diverged: the batch residual is NaN or infinite at iteration {steps}."
            )
        if residual < settings.tolerance:
            break
    out, aux = fn(z)
    batch = z0.shape[0]
    stats = SolverStats(
        iterations=torch.full((batch,), steps, dtype=torch.long, device=z0.device),
        residual=residual.float().expand(batch).clone(),
        converged=(residual < settings.tolerance).expand(batch).clone(),
        evaluations=torch.full((batch,), steps + 1, dtype=torch.long, device=z0.device),
    )
    return FixedPointResult(out, aux, stats)


def iterate_best_per_sample(fn: FixedPointFunction, z0: torch.Tensor, settings: SolverSettings) -> FixedPointResult:
    """The standalone code's `fixed_point_iter` (its default inference for full sequences): damped iterates
    `x' = damping f(x) + (1 - damping) x`, per-sample residual `||x' - x|| / (||x'|| + 1e-9)`, each sample keeping the
    iterate with the lowest residual so far (and the `aux` of the evaluation that produced it), at most
    `max_iterations` evaluations, stopping once the largest residual in the batch is below `tolerance` (the rows are
    coupled). The result is that best damped iterate; no final evaluation. Iterations count up to the best one."""
    x, batch = z0, z0.shape[0]
    best_x, best_aux = z0, None
    best_residual = torch.full((batch,), float("inf"), device=z0.device)
    best_step = torch.zeros(batch, dtype=torch.long, device=z0.device)
    evaluations = 0
    for step in range(settings.max_iterations):
        fx, aux = fn(x)
        evaluations += 1
        fx = (settings.damping * fx + (1 - settings.damping) * x).to(x.dtype)
        difference = (at_least_float32(fx) - at_least_float32(x)).flatten(1).norm(dim=1)
        residual = difference / (at_least_float32(fx).flatten(1).norm(dim=1) + _BEST_EPS)
        improved = residual < best_residual
        best_x = batch_where(improved, fx, best_x)
        best_aux = batch_where(improved, aux, best_aux)
        best_residual = torch.where(improved, residual, best_residual)
        best_step = torch.where(improved, step + 1, best_step)
        x = fx
        if not torch.isfinite(residual).all():
            raise SolverDivergenceError(
                f"Fixed-point solver diverged: the residual of batch sample(s) "
                f"{(~torch.isfinite(residual)).nonzero().flatten().tolist()} is NaN or infinite at iteration {step + 1}."
            )
        if residual.max() < settings.tolerance:
            break
    stats = SolverStats(best_step, best_residual, best_residual < settings.tolerance,
                        torch.full((batch,), evaluations, dtype=torch.long, device=z0.device))
    return FixedPointResult(best_x, best_aux, stats)


# The reference loops by name (`SolverSettings.loop`).
REFERENCE_LOOPS: dict[str, Callable[[FixedPointFunction, torch.Tensor, SolverSettings], FixedPointResult]] = {
    "global_then_undamped": iterate_global_then_undamped,
    "best_per_sample": iterate_best_per_sample,
}
