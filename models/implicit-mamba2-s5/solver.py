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

from .kernels import Kernel, fused_picard_update_available, picard_update_triton
from .numerics import NORM_EPS, at_least_float32

FixedPointFunction = Callable[[torch.Tensor], tuple[torch.Tensor, Any]]

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
    convergence_check_interval: int = 1
    loop: str = "per_sample"

    @classmethod
    def from_config(cls, config: Any, training: bool, mode: str = "simultaneous") -> SolverSettings:
        """The settings of one solve; `mode` (simultaneous or sequential) picks the loop of a reference `stop_rule`
        (see `ImplicitPretrainedConfig.stop_rule`). Training always runs our per-sample loop."""
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
            loop="per_sample" if training else REFERENCE_LOOPS[config.stop_rule][mode],
        )


# Which loop (`LOOPS`) each `stop_rule` runs at inference, per mode.
REFERENCE_LOOPS = {
    "per_sample": {"simultaneous": "per_sample", "sequential": "per_sample"},
    # microsoft/implicit_languagemodels: its own loop (not torchdeq's solver) for every inference forward.
    "torchdeq_reference": {"simultaneous": "global_then_undamped", "sequential": "global_then_undamped"},
    # implicit-languagemodels-standalone: `fixed_point_iter` for full sequences, `_sequential_step` per token.
    "standalone_reference": {"simultaneous": "best_per_sample", "sequential": "global_then_undamped"},
}


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


def residual_norm(fz: torch.Tensor, z: torch.Tensor, stop_mode: str) -> torch.Tensor:
    """Per-sample residual `||f(z) - z||` (`"abs"`) or `||f(z) - z|| / (||z|| + eps)` (`"rel"`), in float32."""
    fz, z = at_least_float32(fz), at_least_float32(z)
    diff = (fz - z).flatten(1).norm(dim=1)
    if stop_mode == "abs":
        return diff
    return diff / (z.flatten(1).norm(dim=1) + NORM_EPS)


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


@dataclass
class SolveState:
    """Everything the iteration carries from one step to the next, on the device (batch in dimension 0).

    `z` is the next iterate, `out`/`aux` the evaluation of `f` at each sample's last active iterate, `active` the
    samples still iterating, `diverged_at` the first iteration whose residual was NaN/inf (0: none) and `step` the
    number of iterations run (a 0-dim tensor, so that a captured CUDA graph can advance it).

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
    return _advance(state, fz, damped, tolerance, stop_mode)


def _advance(
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
        out=fz if state.out is None else _batch_where(active, fz, state.out),
        iterations=torch.where(active, step, state.iterations),
        residual=torch.where(active, res, state.residual),
        converged=state.converged | newly_converged,
        active=active & ~newly_converged,
        diverged_at=torch.where(bad & (state.diverged_at == 0), step, state.diverged_at),
        step=step,
    )


picard_update = Kernel(picard_update_reference)


@picard_update.register("triton", when=lambda state, *args: not torch.is_grad_enabled()
                        and fused_picard_update_available(state.z))
def _picard_update_fused(state: SolveState, fz: torch.Tensor, damping: float, tolerance: float, stop_mode: str
                         ) -> SolveState:
    if state.out is None:  # the kernel writes z and out in place; z0 is the caller's (a warm start: the cache's)
        state = replace(state, z=state.z.clone(), out=fz.clone())
    return picard_update_triton(replace(state, step=state.step + 1), fz, damping, tolerance, stop_mode)


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
        return _advance(state, fz, self.mixer.step(state.z, fz), self.tolerance, self.stop_mode)


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
    aux = step_aux if all_active or state.aux is None else _batch_where(state.active, step_aux, state.aux)
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


# The references' epsilons: added to ||z|| (global loop) and to ||f|| (best-per-sample loop).
_GLOBAL_EPS = 1e-6
_BEST_EPS = 1e-9


def _iterate_global_then_undamped(fn: FixedPointFunction, z0: torch.Tensor, settings: SolverSettings) -> FixedPointResult:
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
    )
    return FixedPointResult(out, aux, stats)


def _iterate_best_per_sample(fn: FixedPointFunction, z0: torch.Tensor, settings: SolverSettings) -> FixedPointResult:
    """The standalone code's `fixed_point_iter` (its default inference for full sequences): damped iterates
    `x' = damping f(x) + (1 - damping) x`, per-sample residual `||x' - x|| / (||x'|| + 1e-9)`, each sample keeping the
    iterate with the lowest residual so far (and the `aux` of the evaluation that produced it), at most
    `max_iterations` evaluations, stopping once the largest residual in the batch is below `tolerance` (the rows are
    coupled). The result is that best damped iterate; no final evaluation. Iterations count up to the best one."""
    x, batch = z0, z0.shape[0]
    best_x, best_aux = z0, None
    best_residual = torch.full((batch,), float("inf"), device=z0.device)
    best_step = torch.zeros(batch, dtype=torch.long, device=z0.device)
    for step in range(settings.max_iterations):
        fx, aux = fn(x)
        fx = (settings.damping * fx + (1 - settings.damping) * x).to(x.dtype)
        difference = (at_least_float32(fx) - at_least_float32(x)).flatten(1).norm(dim=1)
        residual = difference / (at_least_float32(fx).flatten(1).norm(dim=1) + _BEST_EPS)
        improved = residual < best_residual
        best_x = _batch_where(improved, fx, best_x)
        best_aux = _batch_where(improved, aux, best_aux)
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
    stats = SolverStats(best_step, best_residual, best_residual < settings.tolerance)
    return FixedPointResult(best_x, best_aux, stats)


# The inference loops (`SolverSettings.loop`, picked per mode by `REFERENCE_LOOPS`): name -> the loop.
LOOPS: dict[str, Callable[[FixedPointFunction, torch.Tensor, SolverSettings], FixedPointResult]] = {
    "per_sample": _iterate_per_sample,
    "global_then_undamped": _iterate_global_then_undamped,
    "best_per_sample": _iterate_best_per_sample,
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
