"""State-to-state Jacobian of a one-layer implicit Mamba2: autograd through the fixed-point iteration vs Theorem 1.

The implicit SSM of the paper (eq. 8-9) carries the SSM state `h` from token to token; token `t` iterates
`z <- F(z, h_{t-1})` to its fixed point `z*` and then `h_t = S(z*, h_{t-1})`. This command

1. builds `h_{t-1}` by running the model sequentially (its own cache) over the context tokens,
2. differentiates `h_t` with respect to `h_{t-1}` by autograd through every iteration of the last token (eq. 11),
3. evaluates eq. (10) (the implicit function theorem, eq. 14) from one-step Jacobians at the fixed point,
4. and reports their relative difference `|Ja - Jt| / (|Ja| + |Jt| + 1e-16)` (Figure 7 of the paper), the
   off-diagonal mass of the transition, and, for contrast, the same Jacobian of the explicit model (`implicit=False`,
   same weights), whose transition is the diagonal `exp(dt A)`.

The state is the SSM state only (the paper's `h`); the convolution state of the context is held fixed. Runs in
float64 by default. The model is `--model PATH` (a one-layer implicit Mamba2 folder) or `--random-init`, the paper's
Figure-7 model: one layer, d_model 64, d_head 8, d_state 4 (16 heads, 512 state variables). Writes jacobian.json and
jacobian.png (Figure 7's panels for state (head_dim 0, state 0) of every head) to --output-dir.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from implicit_lm.eval.arguments import add_model_arguments
from implicit_lm.eval.plots import new_figure, save_figure
from torch.autograd.functional import jacobian

from implicit_lm.cli import InputError, check_positive, run_cli
from implicit_lm.files import write_json
from implicit_lm.models import DTYPES, load_model, model_fields, solver_kwargs
from implicit_lm.provenance import run_metadata
from implicit_lm.tokens import check_token_range
from modeling_implicit import CacheSnapshot
from modeling_implicit.compat import output_cache

logger = logging.getLogger(__name__)

# The single-layer model of the paper's Figure 7 (expand 2: 128 inner channels / head_dim 8 = 16 heads). The
# vocabulary is small, as in the synthetic state-tracking task the figure's tokens come from.
FIGURE7_CONFIG = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=1, head_dim=8, state_size=4, expand=2, n_groups=1
)
DEFAULT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
RELATIVE_EPS = 1e-16  # the paper's epsilon in the relative difference

# F(z, h) -> (f(z), S(z, h)) on flattened tensors: z (hidden_size,), h and the new state (heads * head_dim * state,).
StepFunction = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TransitionJacobians:
    """Jacobians `dh_t / dh_{t-1}` of one token's transition, `(state, state)` over the flattened SSM state
    `(heads, head_dim, state_size)` (output index first).

    Attributes:
        autograd: autograd through the fixed-point iteration.
        theorem: eq. (10) in the general implicit-function form `dS/dh + dS/dz (I - dF/dz)^-1 dF/dh`.
        lambda_u_form: eq. (10) term by term, `Λ + diag(h) dΛ/dz dφ/dh + du/dz dφ/dh`.
        explicit: the explicit model's transition (same weights, `implicit=False`, its own context states).
        iterations: evaluations of `F` until the last token converged.
        residual: `||F(z) - z|| / ||z||` at the last iteration.
        spectral_radius: of `dF/dz` at the fixed point (< 1: a local contraction, `I - dF/dz` invertible).
        context_iterations: solver iterations of each context token (implicit model).
    """

    autograd: torch.Tensor
    theorem: torch.Tensor
    lambda_u_form: torch.Tensor
    explicit: torch.Tensor
    iterations: int
    residual: float
    spectral_radius: float
    context_iterations: list[int]


def figure7_model(seed: int, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A randomly initialised implicit Mamba2 with the paper's Figure-7 shape."""
    import modeling_implicit as mi

    torch.manual_seed(seed)
    return mi.ImplicitMamba2ForCausalLM(mi.ImplicitMamba2Config(**FIGURE7_CONFIG)).to(dtype).eval()


def check_model(model: torch.nn.Module) -> None:
    """Theorem 1 is about one implicit SSM layer: refuse anything else with a clear message."""
    config = model.config
    if config.model_type != "implicit_mamba2":
        raise InputError(
            f"model_type {config.model_type!r}: the state-to-state Jacobian needs an implicit Mamba2 "
            "(model_type 'implicit_mamba2'), whose recurrent state is the SSM state h of Theorem 1"
        )
    if not config.implicit:
        raise InputError(
            "the model is explicit (implicit=False): pass an implicit Mamba2; the explicit transition of the same "
            "weights is computed for contrast"
        )
    if config.num_hidden_layers != 1:
        raise InputError(
            f"the model has {config.num_hidden_layers} layers; eq. (10) is stated for one implicit SSM layer (with "
            "more, a layer's decay and input also depend on the states of the layers below it at the same step, "
            "and even the explicit transition is not diagonal): pass a model with num_hidden_layers=1"
        )


def context_states(
    model: torch.nn.Module, context: torch.Tensor, **overrides: Any
) -> tuple[tuple[torch.Tensor, ...], list[int]]:
    """The committed `(conv_states, ssm_states)` after running the model sequentially over `context` `(1, length)`
    (with the solver `overrides`), and the solver iterations of each token (empty for an explicit model)."""
    with torch.no_grad():
        try:
            output = model.base_model(
                input_ids=context, use_cache=True, **solver_kwargs(model, inference_mode="sequential", **overrides)
            )
        except FloatingPointError as error:  # the model's SolverDivergenceError
            raise InputError(f"solving the context diverged: {error}") from error
    stats = output.solver_stats
    return output_cache(output).states, [] if stats is None else stats.iterations.flatten().tolist()


def step_function(
    model: torch.nn.Module, token: int, conv_states: torch.Tensor, ssm_shape: torch.Size
) -> tuple[StepFunction, torch.Tensor]:
    """One evaluation of the stack for `token` against a given SSM state, exactly as the solver sees it.

    Returns `step(z, h) -> (F(z, h), S(z, h))`: `F` is the fixed-point map (layer, final norm, injection; eq. 9)
    and `S` the SSM state after the step (eq. 8), both from the model's own `fixed_point_function`. `h` enters
    through a cache built around it (the cache is only read), so autograd sees it. Also returns the token's
    embedding, which is `z` for an explicit model.
    """
    backbone = model.base_model
    ids = torch.tensor([[token]], device=conv_states.device)
    with torch.no_grad():
        embeddings = backbone.get_input_embeddings()(ids)

    def step(z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = backbone.make_cache()
        # One committed token stands for the context: the recurrent state, not the count, is what the step reads.
        cache.restore(CacheSnapshot((conv_states, h.view(ssm_shape)), seen_tokens=1, fixed_point=None))
        with torch.no_grad():  # the injection is a constant of the map: F is differentiated in z and h only
            fn = backbone.fixed_point_function(ids, cache=cache)
        f, ((_, new_ssm_states), _, _) = fn(z.view_as(embeddings))  # per-layer states
        return f.reshape(-1), torch.stack(new_ssm_states, dim=1).reshape(-1)

    return step, embeddings.reshape(-1)


def iterate_to_fixed_point(
    step: StepFunction, h: torch.Tensor, hidden_size: int, tolerance: float, max_iterations: int, damping: float
) -> tuple[torch.Tensor, int, float]:
    """`z <- (1 - damping) z + damping F(z, h)` from `z = 0` (eq. 11; damping 1 is the paper's plain iteration)
    until `||F(z) - z|| / ||z|| < tolerance` (with damping 1, the paper's relative change of `z`). Differentiable in
    `h` when it requires grad. Returns `F` at the last iterate (as the solver does), the number of evaluations and
    the last residual."""
    z = h.new_zeros(hidden_size)
    for iteration in range(1, max_iterations + 1):
        f = step(z, h)[0]
        residual = ((f - z).norm() / z.norm()).item() if iteration > 1 else math.inf  # z = 0 has no relative change
        if iteration > 1 and not math.isfinite(residual):
            raise InputError(f"the fixed-point iteration diverged at iteration {iteration}; try a smaller --damping")
        if residual < tolerance:
            return f, iteration, residual
        z = (1 - damping) * z + damping * f
    raise InputError(
        f"the last token did not converge in {max_iterations} iterations (residual {residual:.3g} >= --tolerance "
        f"{tolerance:g}); raise --max-iterations, loosen --tolerance or lower --damping"
    )


def theorem_jacobian(step: StepFunction, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Eq. (10) at the fixed point `(z*, h)`, in the general form of the implicit function theorem:

        dh_t/dh_{t-1} = dS/dh|_z + dS/dz (I - dF/dz)^-1 dF/dh,   with dφ/dh = (I - dF/dz)^-1 dF/dh (eq. 14).

    For one Mamba2 layer `S(z, h) = Λ(z) ⊙ h + u(z)` (eq. 8: `Λ = exp(dt A)` per head, broadcast over head_dim and
    state; `u = dt x B^T`), so `dS/dh|_z = diag(Λ)` and `dS/dz = diag(h) dΛ/dz + du/dz`, which turns the general
    form into eq. (10), `Λ + diag(h) dΛ/dz dφ/dh + du/dz dφ/dh` (`lambda_u_jacobian` evaluates it term by term).

    Returns the Jacobian, `dφ/dh` and the spectral radius of `dF/dz`.
    """
    (dF_dz, dF_dh), (dS_dz, dS_dh) = jacobian(step, (z, h), vectorize=True)
    identity = torch.eye(z.numel(), dtype=z.dtype, device=z.device)
    dphi_dh = torch.linalg.solve(identity - dF_dz, dF_dh)
    spectral_radius = torch.linalg.eigvals(dF_dz).abs().max().item()
    return dS_dh + dS_dz @ dphi_dh, dphi_dh, spectral_radius


def lambda_u_jacobian(step: StepFunction, z: torch.Tensor, h: torch.Tensor, dphi_dh: torch.Tensor) -> torch.Tensor:
    """Eq. (10) term by term. `S` is affine in `h` with a diagonal coefficient, so the model's own step gives
    `Λ(z) = S(z, 1) - S(z, 0)` and `u(z) = S(z, 0)` without re-implementing Mamba2. The chain rule scales row
    `i` of `dΛ/dz dφ/dh` by `h_i` (`diag(h)` on the left); the paper writes it to the right, which is not the same
    matrix."""
    ones, zeros = torch.ones_like(h), torch.zeros_like(h)

    def decay(z: torch.Tensor) -> torch.Tensor:
        return step(z, ones)[1] - step(z, zeros)[1]

    def drive(z: torch.Tensor) -> torch.Tensor:
        return step(z, zeros)[1]

    with torch.no_grad():
        decays = decay(z)
    dLambda_dz, du_dz = jacobian(decay, z, vectorize=True), jacobian(drive, z, vectorize=True)
    return torch.diag(decays) + h[:, None] * (dLambda_dz @ dphi_dh) + du_dz @ dphi_dh


def compute_jacobians(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    tolerance: float,
    max_iterations: int,
    damping: float = 1.0,
) -> TransitionJacobians:
    """All Jacobians of the transition of the last token of `tokens` (1-D), after the context `tokens[:-1]`.

    The context is solved by the model's own solver with `tolerance` and `max_iterations` (its solver, damping and
    stop mode are kept); the last token is iterated here, with gradient tape.
    """
    check_model(model)
    config = model.config
    device = next(model.parameters()).device
    context, token = tokens[:-1].view(1, -1).to(device), int(tokens[-1])

    (conv_states, ssm_states), context_iterations = context_states(
        model, context, tolerance=tolerance, eval_max_iterations=max_iterations
    )
    step, _ = step_function(model, token, conv_states, ssm_states.shape)
    h = ssm_states.reshape(-1)

    trace: dict[str, Any] = {}

    def transition(h: torch.Tensor) -> torch.Tensor:
        z, trace["iterations"], trace["residual"] = iterate_to_fixed_point(
            step, h, config.hidden_size, tolerance, max_iterations, damping
        )
        trace["z"] = z.detach()
        return step(z, h)[1]

    start = time.perf_counter()
    autograd = jacobian(transition, h, vectorize=True)
    logger.info(
        "Token id %d converged in %d iterations (residual %.2e); autograd Jacobian %s in %.1f s",
        token, trace["iterations"], trace["residual"], tuple(autograd.shape), time.perf_counter() - start,
    )
    theorem, dphi_dh, spectral_radius = theorem_jacobian(step, trace["z"], h)
    lambda_u_form = lambda_u_jacobian(step, trace["z"], h, dphi_dh)

    # Explicit contrast: no injection, z = embedding, one pass; Λ and u depend on the input only.
    with model_fields(model, implicit=False):
        (conv_states, ssm_states), _ = context_states(model, context)
        explicit_step, embedding = step_function(model, token, conv_states, ssm_states.shape)
        explicit = jacobian(lambda h: explicit_step(embedding, h)[1], ssm_states.reshape(-1), vectorize=True)

    return TransitionJacobians(
        autograd=autograd.detach(),
        theorem=theorem.detach(),
        lambda_u_form=lambda_u_form.detach(),
        explicit=explicit.detach(),
        iterations=trace["iterations"],
        residual=trace["residual"],
        spectral_radius=spectral_radius,
        context_iterations=context_iterations,
    )


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The paper's elementwise `|a - b| / (|a| + |b| + 1e-16)`."""
    return (a - b).abs() / (a.abs() + b.abs() + RELATIVE_EPS)


def off_diagonal_mass(matrix: torch.Tensor) -> float:
    """`||J - diag(J)||_F / ||J||_F`: 0 for a diagonal transition (each state variable evolves on its own)."""
    off_diagonal = matrix - torch.diag(torch.diagonal(matrix))
    return (off_diagonal.norm() / matrix.norm()).item()


def head_selection(num_heads: int, head_dim: int, state_size: int) -> torch.Tensor:
    """Figure 7's one state variable per head: `(head, head_dim 0, state 0)`, as indices into the flattened state."""
    return torch.arange(num_heads) * head_dim * state_size


def agreement(autograd: torch.Tensor, theorem: torch.Tensor) -> dict[str, float]:
    relative = relative_difference(autograd, theorem)
    return {
        "relative_difference_max": relative.max().item(),
        "relative_difference_mean": relative.mean().item(),
        "abs_difference_max": (autograd - theorem).abs().max().item(),
    }


def summarize(result: TransitionJacobians, selection: torch.Tensor) -> dict[str, Any]:
    """The JSON results (without metadata) of `compute_jacobians`."""

    def pick(matrix: torch.Tensor) -> torch.Tensor:
        return matrix[selection][:, selection]

    explicit_diagonal = torch.diagonal(result.explicit)
    per_state = result.explicit.shape[0] // selection.numel()
    explicit_per_head = explicit_diagonal.view(selection.numel(), per_state)
    return {
        "fixed_point": {
            "iterations": result.iterations,
            "residual": result.residual,
            "spectral_radius_dF_dz": result.spectral_radius,
        },
        "context_iterations": result.context_iterations,
        "agreement": {
            "full": agreement(result.autograd, result.theorem),
            "per_head": agreement(pick(result.autograd), pick(result.theorem)),
        },
        "lambda_u_form_vs_general_abs_difference_max": (result.lambda_u_form - result.theorem).abs().max().item(),
        "off_diagonal_mass": {
            "implicit": {
                "full": off_diagonal_mass(result.autograd),
                "per_head": off_diagonal_mass(pick(result.autograd)),
            },
            "explicit": {
                "full": off_diagonal_mass(result.explicit),
                "per_head": off_diagonal_mass(pick(result.explicit)),
            },
        },
        # exp(dt A) of each head: the explicit diagonal is constant over a head's head_dim x state_size variables.
        "explicit_decay_per_head": explicit_per_head[:, 0].tolist(),
        "explicit_decay_spread_within_heads": (explicit_per_head.amax(1) - explicit_per_head.amin(1)).max().item(),
        "per_head_jacobians": {
            "autograd": pick(result.autograd).tolist(),
            "theorem": pick(result.theorem).tolist(),
            "explicit": pick(result.explicit).tolist(),
        },
    }


def plot(autograd: torch.Tensor, theorem: torch.Tensor, path: Path, title: str) -> None:
    """Figure 7's three panels on the per-head selection: autograd, eq. (10), relative difference. A symmetric
    log colour scale, so the small off-diagonal entries are visible next to the diagonal decay ~1."""
    from matplotlib.colors import LogNorm, SymLogNorm
    from matplotlib.ticker import MaxNLocator

    figure, axes = new_figure(columns=3, width=4.8, height=4.0)
    figure.set_layout_engine("constrained")  # keeps each colorbar clear of the next panel
    limit = max(autograd.abs().max().item(), theorem.abs().max().item(), RELATIVE_EPS)
    threshold = limit * 1e-6
    norm = SymLogNorm(linthresh=threshold, vmin=-limit, vmax=limit)
    # One tick every two decades above the linear range, and 0.
    decades = [10.0**e for e in range(math.floor(math.log10(limit)), math.ceil(math.log10(threshold)), -2)]
    ticks = [-d for d in decades] + [0.0] + decades[::-1]
    relative = relative_difference(autograd, theorem).clamp_min(RELATIVE_EPS)
    panels = [
        (autograd, "autograd through the iteration", dict(cmap="RdBu_r", norm=norm)),
        (theorem, "eq. (10)", dict(cmap="RdBu_r", norm=norm)),
        (relative, "relative difference", dict(cmap="viridis", norm=LogNorm())),
    ]
    for axis, (matrix, name, style) in zip(axes[0], panels):
        image = axis.imshow(matrix.cpu().numpy(), **style)
        axis.set_title(name)
        axis.set_xlabel("head of $h_{t-1}$")
        axis.set_ylabel("head of $h_t$")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, ticks=ticks if style["norm"] is norm else None)
    figure.suptitle(title)
    save_figure(figure, path)


def parse_tokens(text: str) -> torch.Tensor:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--tokens {text!r}: expected comma-separated integer token ids, e.g. 3,17,5") from None
    return torch.tensor(ids, dtype=torch.long)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="implicit-lm eval jacobian", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser, solver_flags=False, model_required=False)  # or --random-init, checked in `main`
    parser.set_defaults(dtype="float64")
    parser.add_argument("--random-init", action="store_true", help="the paper's Figure-7 model, randomly initialised")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-init and of random tokens")
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument("--tokens", help="comma-separated token ids: the context, then the measured token")
    tokens.add_argument(
        "--length", type=int, default=9, help="random tokens to draw instead (default 9: 8 of context, then 1)"
    )
    parser.add_argument(
        "--tolerance", type=float, help="relative residual of the fixed points (default 1e-10 in float64, 1e-5 float32)"
    )
    parser.add_argument("--max-iterations", type=int, default=1000)
    parser.add_argument("--damping", type=float, default=1.0, help="of the measured token's iteration (1: plain)")
    parser.add_argument("--output-dir", type=Path, default=Path("eval_results"), help="for jacobian.json and .png")
    return parser


@run_cli
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the command; input errors exit with status 2 (`run_cli`). Returns the JSON payload."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_positive(parser, args, "max_iterations")
    if (args.model is None) == (not args.random_init):
        raise InputError("pass exactly one of --model PATH and --random-init")
    dtype = DTYPES[args.dtype]
    if dtype not in DEFAULT_TOLERANCE:
        raise InputError(f"--dtype {args.dtype}: the Jacobians need float64 (recommended) or float32")
    tolerance = DEFAULT_TOLERANCE[dtype] if args.tolerance is None else args.tolerance
    if not tolerance > 0:
        raise InputError(f"--tolerance {tolerance}: must be > 0")
    if not 0 < args.damping <= 1:
        raise InputError(f"--damping {args.damping}: must be in (0, 1]")

    if args.random_init:
        model = figure7_model(args.seed, dtype).to(args.device)
    else:
        model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    check_model(model)
    if args.tokens is not None:
        tokens = parse_tokens(args.tokens)
        source = "--tokens"
    else:
        generator = torch.Generator().manual_seed(args.seed)
        tokens = torch.randint(model.config.vocab_size, (args.length,), generator=generator)
        source = "--length"
    if tokens.numel() < 2:
        raise InputError(f"{source}: need at least 2 tokens (a context for h_(t-1), then the measured token)")
    check_token_range(tokens, model.config.vocab_size, source)

    result = compute_jacobians(model, tokens, tolerance, args.max_iterations, args.damping)
    config = model.config
    selection = head_selection(config.num_heads, config.head_dim, config.state_size)
    payload = {
        "metadata": run_metadata(args, model),
        "tokens": tokens.tolist(),
        "tolerance": tolerance,
        "damping": args.damping,
        "state": {
            "num_heads": config.num_heads,
            "head_dim": config.head_dim,
            "state_size": config.state_size,
            "size": result.autograd.shape[0],
            "per_head_selection": "flattened (head, head_dim, state) index of (h, 0, 0) for each head h",
            "per_head_indices": selection.tolist(),
        },
        **summarize(result, selection),
    }
    write_json(args.output_dir / "jacobian.json", payload)
    plot(
        result.autograd[selection][:, selection],
        result.theorem[selection][:, selection],
        args.output_dir / "jacobian.png",
        f"$dh^*_t/dh^*_{{t-1}}$ at position {len(tokens) - 1}, state (0, 0) of each of the {config.num_heads} heads",
    )

    full, heads = payload["agreement"]["full"], payload["agreement"]["per_head"]
    mass = payload["off_diagonal_mass"]
    print(
        f"fixed point: {result.iterations} iterations, residual {result.residual:.2e}, "
        f"spectral radius of dF/dz {result.spectral_radius:.3f}\n"
        f"eq. (10) vs autograd, relative difference: full {result.autograd.shape[0]}x{result.autograd.shape[1]} "
        f"max {full['relative_difference_max']:.2e} mean {full['relative_difference_mean']:.2e}; "
        f"per head {len(selection)}x{len(selection)} max {heads['relative_difference_max']:.2e}; "
        f"max |difference| {full['abs_difference_max']:.2e}\n"
        f"off-diagonal mass: implicit {mass['implicit']['full']:.3e} (per head {mass['implicit']['per_head']:.3e}), "
        f"explicit {mass['explicit']['full']:.3e} (per head {mass['explicit']['per_head']:.3e})"
    )
    return payload


if __name__ == "__main__":
    main()
