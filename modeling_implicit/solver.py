"""Fixed-point solver shared by every implicit model: forward iteration, Anderson acceleration, phantom gradients.

The solver knows nothing about the model. It iterates a function `fn(z) -> (f(z), aux)` where `z` has the batch in
dimension 0 and `aux` is a tuple of tensors (batch in dimension 0 too, e.g. the recurrent states computed while
evaluating `f`) or `None`. Convergence is judged per sample and converged samples are frozen, so a sample's result
never depends on its batch mates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
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
    skip_converged_rows: bool = True

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
            skip_converged_rows=config.skip_converged_rows,
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

    def select_rows(self, index: torch.Tensor) -> _AndersonUpdate:
        """Keep the history of the rows `index` alone (`_ActiveRows`)."""
        if self.mixer.xs is not None:
            self.mixer.xs, self.mixer.fs = self.mixer.xs.index_select(0, index), self.mixer.fs.index_select(0, index)
        return self


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
    samples = state.diverged_at.nonzero().flatten()
    samples = (samples if state.rows is None else state.rows[samples]).tolist()
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


def _select(value: Any, index: torch.Tensor) -> Any:
    if value is None or isinstance(value, torch.Tensor):
        return value if value is None or value.dim() == 0 else value.index_select(0, index)
    return type(value)(_select(v, index) for v in value)


def _scatter(into: Any, index: torch.Tensor, value: Any) -> None:
    if isinstance(into, torch.Tensor):
        if into.dim() > 0:
            into.index_copy_(0, index, value)
    elif into is not None:
        for i, v in zip(into, value):
            _scatter(i, index, v)


class _ActiveRows:
    """Rows that stopped stop costing compute (`skip_converged_rows`): at a convergence test where some rows of the
    state stopped, the rows still iterating are gathered into a smaller state, with the function of those rows alone
    (`fn.select_rows`) and the update's history of them, and the stopped ones are written to the full batch's state.
    A row's result is unchanged: rows never interact. Only tape-free: a gather would cut an unrolled tape."""

    def __init__(self, fn: FixedPointFunction, settings: SolverSettings, batch: int, device: torch.device):
        self.fn = fn  # the whole batch's; every subset is selected from it
        self.enabled = settings.skip_converged_rows and not torch.is_grad_enabled() and hasattr(fn, "select_rows")
        self.full: SolveState | None = None  # the whole batch's state, rows set aside written into it
        self.evaluations = torch.zeros(batch, dtype=torch.long, device=device)

    def paid(self, state: SolveState, iterations: int) -> None:
        """Count `iterations` evaluations for every row of `state`."""
        if state.rows is None:
            self.evaluations += iterations
        else:
            self.evaluations.index_add_(0, state.rows, torch.full_like(state.rows, iterations))

    def shrink(self, state: SolveState, update: Update) -> tuple[SolveState, FixedPointFunction, Update] | None:
        """The active rows of `state` alone, their function and update; None (and no shrink from now on) when `fn`
        cannot select rows."""
        keep = state.active.nonzero().flatten()
        rows = keep if state.rows is None else state.rows[keep]
        fn = self.fn.select_rows(rows)
        if fn is None:
            self.enabled = False
            return None
        self._set_aside(state)
        selected = SolveState(**{f.name: _select(getattr(state, f.name), keep) for f in fields(SolveState)})
        select_history = getattr(update, "select_rows", None)
        return replace(selected, rows=rows), fn, update if select_history is None else select_history(keep)

    def _set_aside(self, state: SolveState) -> None:
        if self.full is None:  # the first shrink: the state is the whole batch's (and no update writes it again)
            self.full = state
            return
        for f in fields(SolveState):
            if f.name not in ("rows", "step"):
                _scatter(getattr(self.full, f.name), state.rows, getattr(state, f.name))

    def finish(self, state: SolveState) -> SolveState:
        """The whole batch's final state."""
        if self.full is None:
            return state
        self._set_aside(state)
        return replace(self.full, step=state.step)


def _iterate_per_sample(fn: FixedPointFunction, z0: torch.Tensor, settings: SolverSettings) -> FixedPointResult:
    """Our loop: `settings.solver`'s update per sample, converged samples frozen (see the module docstring), and set
    aside at the convergence tests so that they cost nothing more when the solve allows it (`_ActiveRows`)."""
    state = SolveState.start(z0)
    update = make_update(settings)
    active_rows = _ActiveRows(fn, settings, z0.shape[0], z0.device)

    def run_chunk(iterations: int, all_active: bool) -> SolveState:
        nonlocal state, fn, update
        if not all_active and active_rows.enabled:
            shrunk = active_rows.shrink(state, update)
            if shrunk is not None:
                (state, fn, update), all_active = shrunk, True
        for index in range(iterations):
            state = solver_iteration(fn, state, update, all_active=all_active and index == 0)
        active_rows.paid(state, iterations)
        return state

    state = active_rows.finish(run_in_chunks(settings, run_chunk))
    return FixedPointResult(state.out, state.aux, replace(state.stats(), evaluations=active_rows.evaluations))


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
