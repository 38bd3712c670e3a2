"""Fixed-point solver shared by every implicit model: forward iteration, Anderson acceleration, phantom gradients.

The solver knows nothing about the model. It iterates a function `fn(z) -> (f(z), aux)` where `z` has the batch in
dimension 0 and `aux` is a tuple of tensors (batch in dimension 0 too, e.g. the recurrent states computed while
evaluating `f`) or `None`. Convergence is judged per sample and converged samples are frozen, so a sample's result
never depends on its batch mates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from .kernels import picard_update
from .reference_loops import REFERENCE_LOOPS
from .solver_ops import (
    FixedPointFunction,
    FixedPointResult,
    SolverDivergenceError,
    SolveState,
    advance,
    batch_where,
)

# Tikhonov regularisation of Anderson's least-squares system, relative to the mean squared residual.
_ANDERSON_REG = 1e-4


@dataclass
class SolverSettings:
    """The solver fields of an `ImplicitPreTrainedConfig`, resolved for one call (the iteration cap depends on
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
    convergence_check_interval: int = 1
    loop: str = "per_sample"

    @classmethod
    def from_config(cls, config: Any, training: bool, mode: str = "simultaneous") -> SolverSettings:
        """The settings of one solve; `mode` (simultaneous or sequential) picks the loop of a reference
        `inference_loop` (see `ImplicitPreTrainedConfig.inference_loop`). Training always runs our per-sample loop."""
        return cls(
            max_iterations=config.max_iterations if training else config.eval_max_iterations,
            # Without early stopping no residual (>= 0) is below 0 (the test is strict): exactly the cap runs.
            tolerance=float(config.tolerance) if config.early_stop else 0.0,
            stop_mode=config.stop_mode,
            damping=float(config.damping),
            solver=config.solver,
            anderson_memory=config.anderson_memory,
            phantom_steps=config.phantom_steps,
            phantom_damping=float(config.phantom_damping),
            backward=config.backward,
            convergence_check_interval=config.convergence_check_interval,
            loop="per_sample" if training else LOOPS_BY_MODE[config.inference_loop][mode],
        )


# Which loop (`LOOPS`) each `inference_loop` setting runs, per mode.
LOOPS_BY_MODE = {
    "per_sample": {"simultaneous": "per_sample", "sequential": "per_sample"},
    # microsoft/implicit_languagemodels: its own loop (not torchdeq's solver) for every inference forward.
    "torchdeq_reference": {"simultaneous": "global_then_undamped", "sequential": "global_then_undamped"},
    # implicit-languagemodels-standalone: `fixed_point_iter` for full sequences, `_sequential_step` per token.
    "standalone_reference": {"simultaneous": "best_per_sample", "sequential": "global_then_undamped"},
}


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


Update = Callable[[SolveState, torch.Tensor], SolveState]


class _PicardUpdate:
    """The damped fixed-point update `z + damping (f(z) - z)` (`picard_update`: fused where it can be). Stateless."""

    def __init__(self, settings: SolverSettings):
        self.damping, self.tolerance, self.stop_mode = settings.damping, settings.tolerance, settings.stop_mode

    def __call__(self, state: SolveState, fz: torch.Tensor) -> SolveState:
        return picard_update(state, fz, self.damping, self.tolerance, self.stop_mode)


class _AndersonUpdate:
    """Anderson acceleration over the last `anderson_memory` iterates (mixing weight `damping`). It keeps the history
    of one solve: make a new one for each solve."""

    def __init__(self, settings: SolverSettings):
        self.mixer = _Anderson(settings.anderson_memory, settings.damping)
        self.tolerance, self.stop_mode = settings.tolerance, settings.stop_mode

    def __call__(self, state: SolveState, fz: torch.Tensor) -> SolveState:
        return advance(state, fz, self.mixer.step(state.z, fz), self.tolerance, self.stop_mode)


# The solvers (the config's `solver`): name -> the update of one solve, built from the settings it reads.
SOLVER_UPDATES: dict[str, Callable[[SolverSettings], Update]] = {
    "picard": _PicardUpdate,
    "anderson": _AndersonUpdate,
}


def make_update(settings: SolverSettings) -> Update:
    """The update of one solve with `settings` (`SOLVER_UPDATES[settings.solver]`)."""
    return SOLVER_UPDATES[settings.solver](settings)


def solver_iteration(fn: FixedPointFunction, state: SolveState, update: Update, all_active: bool = False) -> SolveState:
    """Evaluate `f` once and advance `state` (spent: see `SolveState`) with `update` (`make_update(settings)`, made once
    per solve), without synchronising with the host.

    `all_active` (known from the last synchronisation) lets the caller skip the per-sample selection of `aux` when no
    sample has stopped yet (`out` is always selected). Samples that stopped keep their `out`, `aux` and statistics.
    """
    fz, step_aux = fn(state.z)
    aux = step_aux if all_active or state.aux is None else batch_where(state.active, step_aux, state.aux)
    return replace(update(state, fz), aux=aux)


def check_divergence(state: SolveState, diverged: bool) -> None:
    """Raise `SolverDivergenceError` naming the samples whose residual became NaN/inf (`diverged` is the host copy
    of `state.diverged_at.any()`)."""
    if not diverged:
        return
    samples = state.diverged_at.nonzero().flatten().tolist()
    first = int(state.diverged_at[state.diverged_at > 0].min())
    raise SolverDivergenceError(
        f"Fixed-point solver diverged: the residual of batch sample(s) {samples} is NaN or infinite from iteration "
        f"{first} on. Try a smaller `damping`, `solver='anderson'`, or check the inputs and weights."
    )


def run_in_chunks(settings: SolverSettings, run_chunk: Callable[[int, bool], SolveState]) -> SolveState:
    """Drive a solve: `run_chunk(iterations, all_active)` advances the solve by that many iterations and returns the
    state; between chunks the host tests convergence and divergence, once per `convergence_check_interval`
    iterations (each test is a synchronisation; a sample that stops in between is frozen on the device all the
    same). `all_active` says every sample was still active at the last test. The iteration cap is exact."""
    all_active = True
    done = 0
    while True:
        chunk = min(settings.convergence_check_interval, settings.max_iterations - done)
        state = run_chunk(chunk, all_active)
        done += chunk
        diverged, any_active, all_active = torch.stack(
            [(state.diverged_at > 0).any(), state.active.any(), state.active.all()]
        ).tolist()
        check_divergence(state, diverged)
        if not any_active or done >= settings.max_iterations:
            return state


def _iterate_per_sample(fn: FixedPointFunction, z0: torch.Tensor, settings: SolverSettings) -> FixedPointResult:
    """Our loop: `settings.solver`'s update per sample, converged samples frozen (see the module docstring)."""
    state = SolveState.start(z0)
    update = make_update(settings)

    def run_chunk(iterations: int, all_active: bool) -> SolveState:
        nonlocal state
        for index in range(iterations):
            state = solver_iteration(fn, state, update, all_active=all_active and index == 0)
        return state

    state = run_in_chunks(settings, run_chunk)
    return FixedPointResult(state.out, state.aux, state.stats())


# The inference loops (`SolverSettings.loop`, picked per mode by `LOOPS_BY_MODE`): name -> the loop.
LOOPS: dict[str, Callable[[FixedPointFunction, torch.Tensor, SolverSettings], FixedPointResult]] = {
    "per_sample": _iterate_per_sample,
    **REFERENCE_LOOPS,
}


def solve_fixed_point(fn: FixedPointFunction, z0: torch.Tensor, settings: SolverSettings) -> FixedPointResult:
    """Find `z* = f(z*)` per sample and attach the gradient the settings ask for.

    - No gradient needed (`torch.is_grad_enabled()` is False): a tape-free solve.
    - `backward="phantom"`: a tape-free solve, then `phantom_steps` damped steps with tape starting from the detached
      solution (eq. 5 of the paper); memory does not depend on the number of solver iterations.
    - `backward="unrolled"`: autograd through every iteration of the solve.
    - `settings.loop` other than `"per_sample"`: one of the reference codebases' inference loops.
    """
    if settings.loop != "per_sample":  # with grad mode on (outside training), autograd records the whole loop
        return LOOPS[settings.loop](fn, z0, settings)
    if not torch.is_grad_enabled() or settings.backward == "unrolled":
        return _iterate_per_sample(fn, z0, settings)
    with torch.no_grad():
        solved = _iterate_per_sample(fn, z0, settings)
    z = solved.z.detach()
    aux = None
    for _ in range(settings.phantom_steps):
        fz, aux = fn(z)
        z = (1 - settings.phantom_damping) * z + settings.phantom_damping * fz
    return FixedPointResult(z, aux, solved.stats)
