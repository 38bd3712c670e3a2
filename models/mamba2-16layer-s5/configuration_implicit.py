"""Configuration shared by every implicit model: the fixed-point solver and the fields all backbones have."""

from __future__ import annotations

import copy
import math
from typing import Any

from transformers import PretrainedConfig

SOLVERS = ("picard", "anderson")
STOP_MODES = ("rel", "abs")
BACKWARDS = ("phantom", "unrolled")
MODES = ("simultaneous", "sequential")
STOP_RULES = ("per_sample", "torchdeq_reference", "standalone_reference")


# The fields one call may override (`model(..., solver_overrides={...})`, also through `generate`): how the fixed point
# is found, never what function is iterated.
SOLVER_OVERRIDE_FIELDS = (
    "max_iterations", "eval_max_iterations", "tolerance", "early_stop", "stop_mode", "damping", "solver",
    "anderson_memory", "phantom_steps", "phantom_damping", "backward", "inference_mode", "prefill_mode", "warm_start",
    "convergence_check_interval", "cuda_graph_decoding", "stop_rule",
)


def _require(condition: bool, field: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ValueError(f"Invalid config value {field}={value!r}: must be {allowed}.")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class ImplicitPretrainedConfig(PretrainedConfig):
    r"""
    Base configuration of implicit language models (the paper "Implicit Language Models are RNNs").

    An implicit model iterates its whole layer stack to a fixed point `z* = f(z*, x)`, with the embedded input `x`
    injected into every layer. The fields below are shared by every implicit architecture; the model-specific
    configurations (`ImplicitMamba2Config`, ...) add the fields of their backbone.

    Model fields (names as in transformers):
        vocab_size (`int`, defaults to 50288): number of token ids the embedding accepts.
        hidden_size (`int`, defaults to 768): width of the residual stream and of the fixed-point variable `z`.
        num_hidden_layers (`int`, defaults to 24): number of blocks in the stack `f` iterates.
        layer_norm_epsilon (`float`, defaults to 1e-5): epsilon of every RMSNorm.
        initializer_range (`float`, defaults to 0.02): standard deviation of the normal initialisation of embeddings
            and linear layers.
        tie_word_embeddings (`bool`, defaults to `True`): share the LM head weight with the token embedding.
        residual_in_fp32 (`bool`, defaults to `True`): keep the residual stream of every block in float32, whatever
            the weights' dtype.
        use_cache (`bool`, defaults to `True`): return a cache of fixed-point states for generation.
        pad_token_id / bos_token_id / eos_token_id (`int`, *optional*): special token ids.

    Solver fields:
        implicit (`bool`, defaults to `True`): `False` gives the explicit model from the same code and weights: no
            input injection, one pass through the stack starting from the embeddings, no solver.
        max_iterations (`int`, defaults to 24): cap on solver iterations (evaluations of `f`) while training.
        eval_max_iterations (`int`, defaults to 96): cap on solver iterations at inference (`model.eval()`).
        tolerance (`float`, defaults to 0.05): stop once the residual of a sample is below it. With
            `stop_mode="rel"` the residual is `||f(z) - z|| / ||z||`, with `"abs"` it is `||f(z) - z||`; norms are
            taken per sample (simultaneous mode: over the whole sequence; sequential mode: over the token).
        early_stop (`bool`, defaults to `True`): stop a sample once its residual is below `tolerance`. `False` runs
            exactly the cap (`max_iterations` / `eval_max_iterations`) iterations, e.g. the bounded phase of the
            paper's curriculum or a fixed test-time budget; `converged` is then False (no test ran) and nothing warns.
        stop_mode (`str`, defaults to `"rel"`): `"rel"` or `"abs"`, see `tolerance`.
        damping (`float`, defaults to 0.8): step of the damped fixed-point update `z <- (1 - damping) z + damping f(z)`,
            in (0, 1]. It moves the iterates, not the fixed point. Also the mixing weight of Anderson acceleration.
        solver (`str`, defaults to `"picard"`): `"picard"` (damped fixed-point iteration) or `"anderson"`
            (Anderson acceleration over the last `anderson_memory` iterates).
        anderson_memory (`int`, defaults to 5): number of past iterates Anderson acceleration mixes.
        phantom_steps (`int`, defaults to 4): `k`, the damped iterations run with gradient tape after the tape-free
            solve when `backward="phantom"` (eq. 5 of the paper). Memory grows with `k`, not with the solve.
        phantom_damping (`float`, defaults to 0.8): `lambda` of eq. 5, the damping of the phantom steps, in (0, 1].
        backward (`str`, defaults to `"phantom"`): `"phantom"` (tape-free solve, then `phantom_steps` steps with
            gradient) or `"unrolled"` (gradient through every iteration: the paper's weight-tied unrolled baseline).
        inference_mode (`str`, defaults to `"simultaneous"`): how a full-sequence forward without a cache is solved
            when not training: `"simultaneous"` (all tokens iterate together, parallel over the sequence) or
            `"sequential"` (token by token, each solved to convergence before its state is committed: an RNN).
            Training always uses the simultaneous mode.
        prefill_mode (`str`, defaults to `"simultaneous"`): how a multi-token forward that fills a cache (the prompt
            of `generate`) is solved. Single-token steps with a cache are always sequential.
        warm_start (`bool`, defaults to `False`): in sequential mode, start each token's solve from the previous
            token's fixed point (kept in the cache) instead of zeros. Same fixed point within `tolerance`, usually in
            fewer iterations.
        convergence_check_interval (`int`, defaults to 1): test convergence on the host every this many iterations.
            Each test synchronises the host with the device; samples that converge in between are frozen on the
            device all the same, so outputs and statistics do not depend on it (at most `interval - 1` evaluations
            of `f` are wasted after the last sample converges). Also the number of iterations one CUDA graph holds.
        cuda_graph_decoding (`bool`, defaults to `False`): on CUDA, capture `convergence_check_interval` solver
            iterations of a single-token sequential step (Mamba2: a shape that repeats every token) in a CUDA graph
            and replay it; eager whenever the shapes change (a new batch size, Llama's growing key/value cache),
            when training, or with `solver="anderson"`. Outputs are those of the eager path.

    Provenance:
        converted_from (`dict`, *optional*): set by `conversion.convert_reference` on a converted checkpoint: the
            reference codebase's layout (`"torchdeq"`, `"noise-fork"` or `"standalone"`), the codebase and the
            reference's own `deq_params` (and its noise settings, if any), kept for the record; the model does not
            read it.

        stop_rule (`str`, defaults to `"per_sample"`): the inference loop. `"per_sample"` is ours (see below).
            The others reproduce a reference codebase's own evaluation exactly, for checking its numbers with a
            converted checkpoint; both couple the rows of a batch (a sample's result depends on its batch mates) and
            ignore `solver`, `stop_mode` and `convergence_check_interval`:
            `"torchdeq_reference"` (microsoft/implicit_languagemodels, every inference forward): at most
            `eval_max_iterations - 1` damped iterations, each tested with one relative norm over the whole batch,
            `||f(z) - z|| / (1e-6 + ||z||) < tolerance` (damping applied before the test), then one undamped
            evaluation that gives the output and the states to commit.
            `"standalone_reference"` (implicit-languagemodels-standalone): in simultaneous mode its
            `fixed_point_iter` (damped iterates, per-sample residual `||x' - x|| / (||x'|| + 1e-9)`, each sample's
            best iterate kept, stop when the largest residual is below `tolerance`, no final evaluation); in
            sequential mode the loop above. Training always uses the per-sample loop.

    Convergence is judged per sample: a sample whose residual is below `tolerance` is frozen while the others go
    on, so its result never depends on its batch mates or on padding.
    """

    vocab_size: int = 50288
    hidden_size: int = 768
    num_hidden_layers: int = 24
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    residual_in_fp32: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    implicit: bool = True
    max_iterations: int = 24
    eval_max_iterations: int = 96
    tolerance: float = 0.05
    early_stop: bool = True
    stop_mode: str = "rel"
    damping: float = 0.8
    solver: str = "picard"
    anderson_memory: int = 5
    phantom_steps: int = 4
    phantom_damping: float = 0.8
    backward: str = "phantom"
    inference_mode: str = "simultaneous"
    prefill_mode: str = "simultaneous"
    warm_start: bool = False
    convergence_check_interval: int = 1
    cuda_graph_decoding: bool = False
    stop_rule: str = "per_sample"
    converted_from: dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the first invalid field, then run transformers' own config validation (special
        token ids, rotary parameters, ...). Models call it on every forward, so settings changed after construction
        (a training curriculum, a user override) are checked too."""
        self.validate_fields()
        super().validate()

    def with_overrides(self, overrides: dict[str, Any] | None) -> ImplicitPretrainedConfig:
        """This config with one call's `solver_overrides` applied: a validated copy (this config is left as it is),
        or this config itself when there are none. Raises `ValueError` for a field that cannot be overridden per call
        (see `SOLVER_OVERRIDE_FIELDS`) or an invalid value."""
        if not overrides:
            return self
        unknown = sorted(set(overrides) - set(SOLVER_OVERRIDE_FIELDS))
        if unknown:
            raise ValueError(
                f"solver_overrides: {unknown} cannot be set per call; the overridable fields are "
                f"{', '.join(SOLVER_OVERRIDE_FIELDS)}."
            )
        resolved = copy.copy(self)
        for name, value in overrides.items():
            setattr(resolved, name, value)
        resolved.validate_fields()
        return resolved

    def validate_fields(self) -> None:
        """Our own checks (family configurations extend them), each naming the field it rejects."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            _require(_positive_int(getattr(self, name)), name, getattr(self, name), "a positive integer")
        _require(self.layer_norm_epsilon > 0, "layer_norm_epsilon", self.layer_norm_epsilon, "> 0")
        _require(self.initializer_range > 0, "initializer_range", self.initializer_range, "> 0")
        _require(isinstance(self.implicit, bool), "implicit", self.implicit, "True or False")
        for name in ("warm_start", "cuda_graph_decoding", "early_stop"):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        for name in ("max_iterations", "eval_max_iterations", "anderson_memory", "convergence_check_interval"):
            _require(_positive_int(getattr(self, name)), name, getattr(self, name), "a positive integer")
        _require(
            isinstance(self.tolerance, (int, float)) and math.isfinite(self.tolerance) and self.tolerance > 0,
            "tolerance",
            self.tolerance,
            "a finite number > 0",
        )
        _require(self.stop_mode in STOP_MODES, "stop_mode", self.stop_mode, f"one of {STOP_MODES}")
        _require(0 < self.damping <= 1, "damping", self.damping, "in (0, 1]")
        _require(self.solver in SOLVERS, "solver", self.solver, f"one of {SOLVERS}")
        _require(
            _positive_int(self.phantom_steps),
            "phantom_steps",
            self.phantom_steps,
            "an integer >= 1",
        )
        _require(0 < self.phantom_damping <= 1, "phantom_damping", self.phantom_damping, "in (0, 1]")
        _require(self.backward in BACKWARDS, "backward", self.backward, f"one of {BACKWARDS}")
        _require(self.inference_mode in MODES, "inference_mode", self.inference_mode, f"one of {MODES}")
        _require(self.prefill_mode in MODES, "prefill_mode", self.prefill_mode, f"one of {MODES}")
        _require(self.stop_rule in STOP_RULES, "stop_rule", self.stop_rule, f"one of {STOP_RULES}")
        _require(
            self.stop_rule == "per_sample" or self.solver == "picard",
            "stop_rule",
            self.stop_rule,
            "'per_sample' with solver='anderson' (the reference loops are damped fixed-point iteration)",
        )
