"""Configuration shared by every implicit model: the fixed-point solver and the fields all backbones have."""

from __future__ import annotations

import copy
import difflib
import functools
import math
import warnings
from typing import Any

from transformers import GenerationConfig, PretrainedConfig

from .solver import LOOPS_BY_MODE, SOLVER_UPDATES

# The names the solver's tables register (one place for each solver and each inference loop).
SOLVERS = tuple(SOLVER_UPDATES)
STOP_MODES = ("rel", "abs")
BACKWARDS = ("phantom", "unrolled")
MODES = ("simultaneous", "sequential")
INFERENCE_LOOPS = tuple(LOOPS_BY_MODE)


# The fields one call may override (`model(..., solver_overrides={...})`, also through `generate`): how the fixed point
# is found, never what function is iterated.
SOLVER_OVERRIDE_FIELDS = (
    "max_iterations", "eval_max_iterations", "tolerance", "early_stop", "stop_mode", "damping", "solver",
    "anderson_memory", "phantom_steps", "phantom_damping", "backward", "inference_mode", "prefill_mode", "warm_start",
    "convergence_check_interval", "skip_converged_rows", "cuda_graph_decoding", "compile_decoding", "compile_simultaneous",
    "inference_loop",
)


class UnknownConfigKeyWarning(UserWarning):
    """A configuration key that no field reads, spelled like one that does (a likely typo: `toleranse=0.1`)."""


def _require(condition: bool, field: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ValueError(f"Invalid config value {field}={value!r}: must be {allowed}.")


def _is_int(value: Any) -> bool:
    """A Python integer, not a bool (`True` is an `int` to Python, never a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or a float, not a bool, a string or None."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _require_number(field: str, value: Any, in_range: Any, allowed: str) -> None:
    """`value` must be a number (int or float, never bool, str or None) for which `in_range(value)` holds; the error
    names the field, the value and `allowed` (the range, as words)."""
    _require(_is_number(value), field, value, f"a number (int or float), {allowed}")
    _require(in_range(value), field, value, allowed)


def _require_pair(field: str, value: Any, in_range: Any, allowed: str) -> None:
    """`value` must be a pair `(low, high)` (list or tuple) of numbers for which `in_range(low, high)` holds."""
    _require(
        isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value),
        field, value, f"a pair of numbers (low, high) with {allowed}",
    )
    _require(in_range(*value), field, value, f"(low, high) with {allowed}")


# Keys that are never a misspelt field of ours, whatever they resemble: transformers' own configuration attributes and
# legacy keys, the generation parameters hub configs carry, and the fields of transformers' Llama and Mamba2 configs
# (a checkpoint converted from those may keep some). Built on first use.
_LEGACY_KEYS = (
    "torch_dtype", "rope_theta", "rope_scaling", "name_or_path", "attn_implementation", "experts_implementation",
    "num_labels", "per_layer_config", "return_unused_kwargs", "use_return_dict", "torchscript", "pretraining_tp",
    "time_step_rank", "norm_before_gate", "rms_norm", "num_heads",
)


@functools.lru_cache(maxsize=1)
def _transformers_keys() -> frozenset[str]:
    from transformers import LlamaConfig, Mamba2Config

    names = set(_LEGACY_KEYS) | set(dir(PretrainedConfig)) | set(dir(LlamaConfig)) | set(dir(Mamba2Config))
    names |= set(GenerationConfig().to_dict())
    return frozenset(names)


def _warn_near_misses(config: PretrainedConfig, extra: dict[str, Any], stacklevel: int) -> None:
    """Warn for every key of `extra` (keys no field of `config` reads) whose name is close to one of its fields: the
    field keeps its value, so the setting the user meant is silently not applied. Other extra keys are accepted
    silently, as transformers accepts them (hub configs carry many)."""
    fields = sorted({*getattr(type(config), "__dataclass_fields__", {}), *type(config).attribute_map})
    for key, value in extra.items():
        if not isinstance(key, str) or key.startswith("_") or key in fields:
            continue
        match = difflib.get_close_matches(key, fields, n=1, cutoff=0.8)
        if match and key not in _transformers_keys():
            warnings.warn(
                f"{type(config).__name__}: {key}={value!r} is not a field of the configuration, so nothing reads "
                f"it; did you mean {match[0]!r}? ({match[0]} stays {getattr(config, match[0], None)!r}.)",
                UnknownConfigKeyWarning,
                stacklevel=stacklevel + 1,
            )


class ImplicitPreTrainedConfig(PretrainedConfig):
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
        pad_token_id / bos_token_id / eos_token_id (`int`, *optional*): special token ids (`eos_token_id` may also
            be a list of ids).

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
        inference_loop (`str`, defaults to `"per_sample"`): the loop that solves at inference (formerly
            `stop_rule`, a key still read). `"per_sample"` is ours (see below).
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
        warm_start (`bool`, defaults to `False`): in sequential mode, start each token's solve from the previous
            token's fixed point (kept in the cache) instead of zeros. Same fixed point within `tolerance` on a
            contraction, but measured 11-32% more iterations than from zeros (docs/BENCHMARKS.md): a token's first
            evaluation from zero is already dominated by its own injected input.
        convergence_check_interval (`int`, defaults to 1): test convergence on the host every this many iterations.
            Each test synchronises the host with the device; samples that converge in between are frozen on the
            device all the same, so outputs and statistics do not depend on it (at most `interval - 1` evaluations
            of `f` are wasted after the last sample converges). Also the number of iterations one CUDA graph holds.
        skip_converged_rows (`bool`, defaults to `True`): at each convergence test of a solve without a tape
            (inference, and the tape-free part of a phantom-gradient step), gather the rows still iterating and
            evaluate only them from then on, so that a batch pays for its rows' iterations rather than its slowest
            row's for all of them (`SolverStats.evaluations` counts what each row paid). A gather copies the active
            rows' committed states once per test at which some row stopped. Results are those of each row solved
            alone; off with a stochastic stack (its noise is drawn for the whole batch) and in the graph paths
            (`cuda_graph_decoding`, `compile_decoding`), whose shapes are fixed.
        cuda_graph_decoding (`bool`, defaults to `False`): on CUDA, capture `convergence_check_interval` solver
            iterations of a single-token sequential step in a CUDA graph over static buffers and replay it (Mamba2:
            fixed-size states; Llama: attention over its whole key/value buffers, masked, so that the shapes change
            only when the cache doubles its room); eager for the first token of a shape, when training, with
            `solver="anderson"`, a reference `inference_loop`, a stochastic stack (Mamba2's noise study), Llama's
            flash attention or attention maps. Outputs are those of the eager path without `skip_converged_rows`
            (a graph evaluates the whole batch until its last row stops).
        compile_decoding (`bool`, defaults to `False`): run those `convergence_check_interval` iterations of a
            single-token step through `torch.compile` (one graph: the stack evaluation and the Picard update; inductor,
            which needs a C++ compiler on the CPU), on any device, under the same conditions as
            `cuda_graph_decoding` (with which it combines on CUDA: the compiled chunk is what the graph captures).
            The first repeat of a shape compiles (seconds to tens of seconds; measured in docs/BENCHMARKS.md), every
            later token of that shape reuses the graph (Llama: one graph per key/value buffer width, which doubles);
            a process that compiled more shapes than torch's recompile limit (8) decodes the rest eagerly, with a
            warning. Outputs are those of the eager path within floating-point reassociation.
        compile_simultaneous (`bool`, defaults to `False`): evaluate the stack of simultaneous solves (full-sequence
            forwards, prefills) through `torch.compile` (inductor, automatic dynamic shapes: a second sequence
            length or batch size recompiles once with symbolic sizes) whenever no tape is recorded (inference, the
            tape-free part of a phantom-gradient step). Measured on this project's CPU: 1.2-1.9x per evaluation
            after 8-30 s of compiling (docs/BENCHMARKS.md); pays on long evaluations of one shape. Outputs are those
            of the eager path within floating-point reassociation.

    Provenance:
        converted_from (`dict`, *optional*): set by `conversion.convert_reference` on a converted checkpoint: the
            reference codebase's layout (`"torchdeq"`, `"noise-fork"` or `"standalone"`), the codebase and the
            reference's own `deq_params` (and its noise settings, if any), kept for the record; the model does not
            read it.

    Convergence is judged per sample: a sample whose residual is below `tolerance` is frozen while the others go
    on, so its result never depends on its batch mates or on padding.

    Checks: `validate()` raises `ValueError` naming the first invalid field and its value. Counts (`int` above) must
    be Python ints, real-valued settings (`float` above) ints or floats: booleans, strings and None are refused in
    both, except in fields marked *optional*. It runs when the config is built (also from a `config.json`), after
    `from_pretrained(..., tolerance=...)` (of a model, a config or `AutoConfig`) applied its keyword overrides, and at
    a model's forward when fields changed since its last forward. A key that is no field is kept as an attribute that
    nothing reads, as in transformers (hub configs carry `architectures`, `auto_map`, ...); when its name is close to
    a field's (`toleranse`), an `UnknownConfigKeyWarning` names the field meant.
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
    skip_converged_rows: bool = True
    cuda_graph_decoding: bool = False
    compile_decoding: bool = False
    compile_simultaneous: bool = False
    inference_loop: str = "per_sample"
    converted_from: dict[str, Any] | None = None

    # Old names of fields, still read and written through (configs saved by earlier releases, user code).
    attribute_map = {"stop_rule": "inference_loop"}

    @property
    def stochastic_stack(self) -> bool:
        """Whether an evaluation of the layer stack draws random numbers (a family's stochastic layers; Mamba2's noise
        study), so that no recorded CUDA graph can replay it. False here; a family with such layers overrides it."""
        return False

    def __post_init__(self, **kwargs: Any) -> None:
        # `kwargs` are the keys that are not fields (transformers' legacy keys, hub metadata, typos).
        _warn_near_misses(self, kwargs, stacklevel=3)
        super().__post_init__(**kwargs)
        self.validate()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """transformers' `from_dict` (what `from_pretrained` of a config, of `AutoConfig` and of a model calls), then
        the checks of construction on the result: transformers sets the keyword overrides
        (`from_pretrained(folder, tolerance=1e-3)`) on the config after building it, so they are validated here, and
        an override that matches no field but is spelt like one warns (`UnknownConfigKeyWarning`)."""
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        unused = {key: value for key, value in kwargs.items() if not hasattr(config, key)}
        _warn_near_misses(config, unused, stacklevel=2)
        config.validate()
        return result

    def validate(self) -> None:
        """Raise `ValueError` naming the first invalid field and its value, then run transformers' own config
        validation (special token ids, rotary parameters, ...). Runs when a config is built, after `from_dict` /
        `from_pretrained` applied their keyword overrides, and at a model's forward whenever the config's fields
        changed since the model's last forward (a training curriculum, a user's `model.config.tolerance = ...`); a
        call's `solver_overrides` are checked on the call's own copy (`with_overrides`)."""
        self.validate_fields()
        super().validate()

    def with_overrides(self, overrides: dict[str, Any] | None) -> ImplicitPreTrainedConfig:
        """This config with one call's `solver_overrides` applied: a validated copy (this config is left as it is),
        or this config itself when there are none. Raises `ValueError` for a field that cannot be overridden per call
        (see `SOLVER_OVERRIDE_FIELDS`) or an invalid value."""
        if not overrides:
            return self
        overrides = {self.attribute_map.get(name, name): value for name, value in overrides.items()}
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
        """Our own checks (family configurations extend them), each naming the field it rejects and its value. Counts
        must be ints and real-valued settings ints or floats; booleans, strings and None are refused in both."""
        for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "max_iterations", "eval_max_iterations",
            "anderson_memory", "phantom_steps", "convergence_check_interval",
        ):
            _require(_positive_int(getattr(self, name)), name, getattr(self, name), "a positive integer")
        for name in ("layer_norm_epsilon", "initializer_range", "tolerance"):
            _require_number(name, getattr(self, name), lambda v: math.isfinite(v) and v > 0, "finite and > 0")
        for name in ("damping", "phantom_damping"):
            _require_number(name, getattr(self, name), lambda v: 0 < v <= 1, "in (0, 1]")
        for name in ("implicit", "warm_start", "skip_converged_rows", "cuda_graph_decoding", "compile_decoding",
                     "compile_simultaneous", "early_stop", "residual_in_fp32"):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name, None)
            _require(value is None or _is_int(value), name, value, "None or an integer token id")
        eos = getattr(self, "eos_token_id", None)
        _require(
            eos is None or _is_int(eos) or (isinstance(eos, (list, tuple)) and all(_is_int(i) for i in eos)),
            "eos_token_id", eos, "None, an integer token id or a list of them",
        )
        _require(self.stop_mode in STOP_MODES, "stop_mode", self.stop_mode, f"one of {STOP_MODES}")
        _require(self.solver in SOLVERS, "solver", self.solver, f"one of {SOLVERS}")
        _require(self.backward in BACKWARDS, "backward", self.backward, f"one of {BACKWARDS}")
        _require(self.inference_mode in MODES, "inference_mode", self.inference_mode, f"one of {MODES}")
        _require(self.prefill_mode in MODES, "prefill_mode", self.prefill_mode, f"one of {MODES}")
        _require(self.inference_loop in INFERENCE_LOOPS, "inference_loop", self.inference_loop,
                 f"one of {INFERENCE_LOOPS}")
        _require(
            self.inference_loop == "per_sample" or self.solver == "picard",
            "inference_loop",
            self.inference_loop,
            "'per_sample' with solver='anderson' (the reference loops are damped fixed-point iteration)",
        )


# The earlier name (transformers 4's spelling, `PretrainedConfig`), kept for code that imports it.
ImplicitPretrainedConfig = ImplicitPreTrainedConfig
