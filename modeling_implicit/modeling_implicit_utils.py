"""Pieces every implicit model shares: outputs, the fixed-point cache base, the call driver and the causal-LM glue.

A family's backbone (`ImplicitMamba2Model`, `ImplicitLlamaModel`) reads top to bottom in its own `forward`: a
`FixedPointCall` resolves the call (settings, cache, mode), then the backbone embeds, injects, builds its stack inputs
and solves in the call's mode. What the family provides are the methods of `ImplicitBackboneMixin` that raise
`NotImplementedError` (`make_cache`, `prepare_stack_inputs`, `evaluate_stack`); what every family shares (which mode
to solve in, the solver, padding, committing states, CUDA-graph decoding, warm start, statistics, warnings) lives
here once.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .compat import CACHE_NAME, RecurrentGenerationMixin, cache_argument, cache_field, output_cache
from .configuration_implicit import ImplicitPreTrainedConfig
from .decode_graphs import DecodeGraphs
from .numerics import at_least_float32
from .solver import SolverSettings, solve_fixed_point
from .solver_ops import FixedPointResult, SolverStats


class ConvergenceWarning(UserWarning):
    """Some samples (or tokens) reached the iteration cap before the residual fell below the tolerance."""


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in at least float32 (as Llama's and Mamba2's)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = at_least_float32(hidden_states)
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


class InputInjection(nn.Module):
    """The input injection shared by all layers: `Linear(RMSNorm(embeddings))` (weight, bias and `norm.weight`),
    added to every layer's input projection.

    Initialised with std `hidden_size ** -0.5` (see `init_weights`): the injected input then dominates the projection
    of `z`, so a freshly initialised model is a contraction and the solver converges from the first step.

    Not an `nn.Linear` subclass: tools that treat every `nn.Linear` as `x @ W.T + b` of its input (PEFT's LoRA and
    `target_modules="all-linear"`, quantizers that swap Linear modules) would bypass or drop the norm.
    """

    def __init__(self, hidden_size: int, out_features: int, eps: float):
        super().__init__()
        self.in_features = hidden_size
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, hidden_size))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.norm = RMSNorm(hidden_size, eps=eps)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(embeddings), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    @torch.no_grad()
    def init_weights(self) -> None:
        init.normal_(self.weight, std=self.in_features**-0.5)
        init.zeros_(self.bias)


def make_injection(config: ImplicitPreTrainedConfig, out_features: int) -> InputInjection | None:
    """The input injection of a family whose blocks take `out_features` injected channels; None for explicit
    models (`implicit=False`), which evaluate the stack once on the embeddings."""
    if not config.implicit:
        return None
    return InputInjection(config.hidden_size, out_features, config.layer_norm_epsilon)


class ImplicitLayer(GradientCheckpointingLayer):
    """A block of an implicit stack. With activation checkpointing on (`model.gradient_checkpointing_enable()`), a block
    is checkpointed only when autograd records the call: the phantom steps, or every iteration of an unrolled backward.
    The tape-free solver iterations run under `no_grad`, where nothing is saved; a checkpoint there would still copy
    the RNG states on every call (and with `use_reentrant=True` warn whenever no input requires grad).

    `residual(z)` is the block's residual stream: in float32 with `config.residual_in_fp32`, as Mamba's blocks."""

    def __init__(self, config: ImplicitPreTrainedConfig):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return nn.Module.__call__(self, *args, **kwargs)
        return super().__call__(*args, **kwargs)

    def residual(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return at_least_float32(hidden_states) if self.residual_in_fp32 else hidden_states


@dataclass
class ImplicitModelOutput(BaseModelOutputWithPast):
    """Output of an implicit backbone: transformers' `BaseModelOutputWithPast` plus the solver statistics.

    Attributes:
        last_hidden_state: `(batch, seq_len, hidden_size)` the fixed point `z*` (after the final norm).
        cache (transformers >= 5.24) / past_key_values (earlier): the `ImplicitCache` holding the committed fixed-point
            states, when `use_cache` (see `compat.CACHE_NAME`).
        hidden_states / attentions: see the backbone's `forward`.
        solver_stats: per-sample (`(batch,)`, simultaneous mode) or per-token (`(batch, seq_len)`, sequential mode)
            iterations, final residuals and convergence flags; `None` for explicit models.
    """

    solver_stats: SolverStats | None = None


@dataclass
class ImplicitCausalLMOutput(CausalLMOutputWithPast):
    """Output of an implicit causal LM: transformers' `CausalLMOutputWithPast` (`loss` when `labels` are given,
    float32 `logits`, the cache, hidden states and attentions) plus the backbone's `solver_stats` (see
    `ImplicitModelOutput`)."""

    solver_stats: SolverStats | None = None


def _select_rows(value: Any, index: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.dim() == 0 or value.shape[0] == 1 else value.index_select(0, index)
    if isinstance(value, tuple):
        return type(value)(_select_rows(v, index) for v in value)
    return value


@dataclass
class StackInputs:
    """What one evaluation of the layer stack needs besides `z` and the cache, built once per forward call before
    the solver starts iterating.

    Attributes:
        padding_mask: `(batch, seq_len)` 1 for real tokens and 0 for padding among the new tokens, or `None` when
            nothing is padded. Padding positions of `z` are held at zero, so they never enter a residual.
        output_hidden_states / output_attentions: record, in every evaluation, what `StackRecorder` collects.

    Models with attention subclass it with their masks and positional embeddings and override `token`.
    """

    padding_mask: torch.Tensor | None
    output_hidden_states: bool = False
    output_attentions: bool = False

    def token(self, index: int, past_len: int) -> StackInputs:
        """The inputs of new token `index` alone: a sequential step after `past_len + index` committed tokens."""
        mask = None if self.padding_mask is None else self.padding_mask[:, index : index + 1]
        return replace(self, padding_mask=mask)

    def rows(self, index: torch.Tensor) -> StackInputs:
        """The inputs of the batch rows `index` alone (what the solver evaluates once other rows converged): every
        tensor field (or tuple of tensors) with the batch in dimension 0 is selected; one of batch 1 broadcasts and
        is kept (a selection happens only in a batch of two or more)."""
        return replace(self, **{f.name: _select_rows(getattr(self, f.name), index) for f in fields(self)})


class StackRecorder:
    """What one evaluation of the stack exposes as transformers outputs, when its `StackInputs` ask for it.

    Hidden states follow transformers' Llama and Mamba2: the input of the first block (here the iterate `z` the
    evaluation starts from, since the embeddings enter through the injection), then each block's output, the last one
    after the final norm (so it equals the evaluation's output). Attention maps: one per block, from attention
    implementations that return them (eager).
    """

    def __init__(self, stack_inputs: StackInputs, z: torch.Tensor):
        self.hidden_states = [z] if stack_inputs.output_hidden_states else None
        self.attentions = [] if stack_inputs.output_attentions else None

    def block(self, hidden_states: torch.Tensor, attention: torch.Tensor | None = None) -> None:
        if self.hidden_states is not None:
            self.hidden_states.append(hidden_states)
        if self.attentions is not None:
            self.attentions.append(attention)

    def finish(self, normed: torch.Tensor) -> tuple[tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """`(hidden_states, attentions)` of the evaluation (None where not asked for); `normed` is the output."""
        hidden_states = None
        if self.hidden_states is not None:
            hidden_states = (*self.hidden_states[:-1], normed)
        return hidden_states, None if self.attentions is None else tuple(self.attentions)


def _join_tokens(per_token: list[tuple[torch.Tensor, ...] | None], dim: int) -> tuple[torch.Tensor, ...] | None:
    """Per-layer tensors of consecutive token solves joined along `dim` (None when nothing was recorded)."""
    if per_token[0] is None:
        return None
    return tuple(torch.cat(layer, dim=dim) for layer in zip(*per_token))


def _join_token_attentions(per_token: list[tuple[torch.Tensor, ...] | None]) -> tuple[torch.Tensor, ...] | None:
    """Attention maps `(batch, heads, 1, keys_t)` of consecutive token solves as `(batch, heads, tokens, keys)`:
    each token's row padded with zeros for the keys after it, which it cannot see."""
    if per_token[0] is None:
        return None
    keys = per_token[-1][0].shape[-1]
    padded = [tuple(F.pad(layer, (0, keys - layer.shape[-1])) for layer in token) for token in per_token]
    return _join_tokens(padded, dim=2)


class CacheSnapshot(NamedTuple):
    """What an `ImplicitCache` holds: `states` (as `ImplicitCache.states`), the number of committed tokens and the last
    token's fixed point."""

    states: tuple[torch.Tensor, ...] | None
    seen_tokens: int
    fixed_point: torch.Tensor | None


def _first_tensor(states: Any) -> torch.Tensor:
    return states if isinstance(states, torch.Tensor) else _first_tensor(states[0])


def _detach(states: Any) -> Any:
    return states.detach() if isinstance(states, torch.Tensor) else type(states)(_detach(s) for s in states)


class ImplicitCache(Cache):
    """Base of the caches that hold an implicit model's states *at the fixed point* for sequential generation.

    `states` is a tuple of tensors with the batch in dimension 0 (what the model's `evaluate_stack` returns).
    The solver only reads them while iterating on new tokens; `commit` stores the converged result once.
    Subclasses define how new states join the committed ones (`_store`) and may keep room for the tokens being solved
    (`reserve`). `fixed_point` is the last token's fixed point `(batch, 1, hidden_size)`, the start of the next
    token's solve with `config.warm_start`.
    """

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.states: tuple[torch.Tensor, ...] | None = None
        self.fixed_point: torch.Tensor | None = None
        self.seen_tokens = 0

    def _store(self, new_states: tuple, num_tokens: int) -> None:
        """Join the `num_tokens` new tokens' states (as `evaluate_stack` returns them, detached) to the cache."""
        raise NotImplementedError

    def reserve(self, num_tokens: int) -> None:
        """Called before solving `num_tokens` new tokens against this cache; caches with scratch room grow it here."""

    def commit(self, new_states: tuple, num_tokens: int, fixed_point: torch.Tensor | None = None) -> None:
        """Store the fixed-point states reached after `num_tokens` more tokens and the last token's fixed point."""
        new_batch = _first_tensor(new_states).shape[0]
        if self.states is not None and new_batch != self.states[0].shape[0]:
            raise ValueError(
                f"Cache holds a batch of {self.states[0].shape[0]} but the new states have batch "
                f"{new_batch}; reset the cache or pass inputs of the cached batch size."
            )
        self._store(_detach(new_states), num_tokens)
        self.fixed_point = None if fixed_point is None else fixed_point.detach()
        self.seen_tokens += num_tokens

    def snapshot(self) -> CacheSnapshot:
        """The committed states, token count and last fixed point, without copying them."""
        return CacheSnapshot(self.states, self.seen_tokens, self.fixed_point)

    def restore(self, snapshot: CacheSnapshot) -> None:
        """Make this cache hold `snapshot` (tensors are shared, not copied): what the CUDA-graph path does to solve
        against static copies of a cache, and how a cache is rebuilt from states held elsewhere."""
        self.states = snapshot.states
        self.seen_tokens = snapshot.seen_tokens
        self.fixed_point = snapshot.fixed_point

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def _apply_to_batch(self, fn: Any) -> None:
        if self.states is not None:
            self.states = tuple(fn(s) for s in self.states)
        if self.fixed_point is not None:
            self.fixed_point = fn(self.fixed_point)

    def rows(self, index: torch.Tensor) -> ImplicitCache:
        """A cache of the same kind holding copies of the batch rows `index` of this one, which is left unchanged:
        what the solver evaluates against once other rows of the batch converged."""
        selected = copy.copy(self)
        selected._apply_to_batch(lambda s: s.index_select(0, index.to(s.device)))
        return selected

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_to_batch(lambda s: s.index_select(0, beam_idx.to(s.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_to_batch(lambda s: s[indices.to(s.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_to_batch(lambda s: s.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.states = None
        self.fixed_point = None
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError(
                f"{type(self).__name__} holds recurrent fixed-point states, which cannot be rolled back by tokens."
            )

    def __len__(self) -> int:
        """Number of layers whose states the cache holds (0 until the first commit), as for transformers' caches."""
        return 0 if self.states is None else self._num_layers()

    def _num_layers(self) -> int:
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        return -1 if self.states is None else self.states[0].shape[0]

    @property
    def is_compileable(self) -> bool:
        return False  # the solver loop is data dependent

    @property
    def is_initialized(self) -> bool:
        return self.states is not None

    @property
    def is_croppable(self) -> bool:
        return False

    def __repr__(self) -> str:
        shapes = None if self.states is None else [tuple(s.shape) for s in self.states]
        return f"{type(self).__name__}(seen_tokens={self.seen_tokens}, states={shapes})"


def _warn_if_not_converged(stats: SolverStats | None) -> None:
    if stats is None:
        return
    failed = (~stats.converged).sum().item()
    if failed:
        total = stats.converged.numel()
        warnings.warn(
            f"Fixed-point solver did not converge for {failed} of {total} solves (max residual "
            f"{stats.residual.max().item():.3g}, iterations {stats.iterations.max().item()}); raise "
            "`eval_max_iterations`/`max_iterations` or `tolerance`, or inspect `outputs.solver_stats`.",
            ConvergenceWarning,
            stacklevel=4,
        )


def solve_mode(training: bool, cache_passed: bool, seq_len: int, config: ImplicitPreTrainedConfig) -> str:
    """The mode a forward call solves in; the one place these rules live.

    - Training: simultaneous (the phantom backward differentiates the parallel solve).
    - A cache passed in (generation): one new token is a sequential step, several are a prefill (`prefill_mode`).
    - No cache passed, a full-sequence forward: `inference_mode`.
    """
    if training:
        return "simultaneous"
    if not cache_passed:
        return config.inference_mode
    return "sequential" if seq_len == 1 else config.prefill_mode


def compile_stack(evaluate: Callable[..., Any]) -> Callable[..., Any]:
    """A backbone's `evaluate_stack` compiled for `compile_simultaneous` (inductor, automatic dynamic shapes)."""
    return torch.compile(evaluate)


def decode_graphs_apply(config: ImplicitPreTrainedConfig) -> bool:
    """The config asks for the static-buffer decode path (CUDA graphs, torch.compile) and allows it: implicit, Picard
    (Anderson's history is not static), our per-sample loop, a deterministic stack (fresh random draws per evaluation
    are not a replayable graph)."""
    return (
        (config.cuda_graph_decoding or config.compile_decoding)
        and config.implicit
        and config.solver == "picard"
        and config.inference_loop == "per_sample"
        and not config.stochastic_stack
    )


def can_capture_graphs(inputs_embeds: torch.Tensor) -> bool:
    """A CUDA graph can be recorded for this call: CUDA tensors, no autograd tape."""
    return inputs_embeds.is_cuda and not torch.is_grad_enabled()


def use_decode_graphs(inputs_embeds: torch.Tensor, config: ImplicitPreTrainedConfig) -> bool:
    """A single-token step decodes through the static buffers of `decode_graphs.py`: compiled where
    `compile_decoding` asks (any device, no autograd tape), captured where a CUDA graph can be."""
    if not decode_graphs_apply(config):
        return False
    return (config.compile_decoding and not torch.is_grad_enabled()) or (
        config.cuda_graph_decoding and can_capture_graphs(inputs_embeds))


def _cache_contents(cache: ImplicitCache) -> str:
    """What a cache holds, for error messages: '18 tokens for a batch of 2'."""
    if cache.states is None:
        return f"{cache.get_seq_length()} tokens (it is empty)"
    return f"{cache.get_seq_length()} tokens for a batch of {cache.batch_size}"


def _check_call_continues_cache(
    cache: ImplicitCache | None, batch: int, seq_len: int, cache_position: torch.Tensor | None
) -> None:
    """The one check that a forward call's new tokens can follow what `cache` holds (both families, `forward` and
    every step of `generate`): the cached batch size, and `cache_position` (when given) numbering the new tokens right
    after the cached ones. Raises `ValueError` saying what the cache holds and what the call gave. (The attention mask
    is checked against the cache's length in `_validated_mask`.)"""
    past_len = 0 if cache is None else cache.get_seq_length()
    if cache is not None and cache.states is not None and cache.batch_size != batch:
        raise ValueError(
            f"The cache holds {_cache_contents(cache)}, but this call gives {seq_len} new tokens for a batch of "
            f"{batch}. Continue the cached sequences with inputs of batch size {cache.batch_size}, or pass no cache "
            "(or a fresh one) to start a new batch."
        )
    if cache_position is not None:
        positions = cache_position.reshape(-1)
        first = int(positions[0]) if positions.numel() else None
        if positions.numel() != seq_len or first != past_len:
            given = f"{positions.numel()} positions starting at {first}" if positions.numel() else "no positions"
            held = f"the cache holds {_cache_contents(cache)}" if cache is not None else "no cache is passed"
            raise ValueError(
                f"cache_position gives {given}, but {held} and this call gives {seq_len} new tokens, which are "
                f"positions {past_len} to {past_len + seq_len - 1}. A call continues what its cache holds: a new "
                "prompt needs no cache (or a fresh one)."
            )


def _validated_mask(attention_mask: torch.Tensor | None, batch: int, seq_len: int, past_len: int) -> torch.Tensor | None:
    """The `(batch, past_len + seq_len)` 0/1 mask covering cached and new tokens, or None (no padding)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
        raise ValueError(f"attention_mask must have shape (batch={batch}, length); got {tuple(attention_mask.shape)}.")
    length = attention_mask.shape[1]
    if length == seq_len and past_len > 0:
        raise ValueError(
            f"attention_mask covers only the {seq_len} new tokens, but the cache holds {past_len} tokens: to continue "
            f"the cached sequences pass the mask of the whole sequence, shape ({batch}, {past_len + seq_len}); for a "
            "new prompt, pass no cache (or a fresh one)."
        )
    if length != past_len + seq_len:
        cached = f"the cache holds {past_len} tokens" if past_len else "nothing is cached"
        raise ValueError(
            f"attention_mask has length {length}, but {cached} and this call gives {seq_len} new tokens: expected "
            f"length {past_len + seq_len} (cached {past_len} + new {seq_len})."
        )
    if bool(attention_mask.all()):
        return None
    return attention_mask


@dataclass
class SolvedStack:
    """A call's fixed point `(batch, seq_len, hidden_size)`, its solver statistics (None for explicit models) and
    what the evaluation that produced it recorded (see `StackRecorder`)."""

    hidden: torch.Tensor
    stats: SolverStats | None
    hidden_states: tuple[torch.Tensor, ...] | None
    attentions: tuple[torch.Tensor, ...] | None


@dataclass
class StackFunction:
    """The map `f` a solve iterates: `z -> (f(z), (states, hidden_states, attentions))`, one `evaluate` of the stack
    on `z` with the injected input, against the committed `cache` (only read), padding positions held at zero.
    `select_rows` gives the same map on a subset of the batch rows, which the solver evaluates alone once the other
    rows converged (None when an evaluation couples the rows: a stochastic stack draws its noise for the batch).
    `compiled_evaluate` (`compile_simultaneous`) is `evaluate` compiled, used for evaluations without a tape."""

    evaluate: Callable[..., tuple[torch.Tensor, Any]]
    injection: torch.Tensor | None
    stack_inputs: StackInputs
    cache: ImplicitCache | None
    return_states: bool
    rows_separable: bool = True
    compiled_evaluate: Callable[..., tuple[torch.Tensor, Any]] | None = None

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, Any]:
        evaluate = self.evaluate
        if self.compiled_evaluate is not None and not torch.is_grad_enabled():
            evaluate = self.compiled_evaluate
        out, aux = evaluate(z, self.injection, self.stack_inputs, self.cache, self.return_states)
        out = out.to(z.dtype)
        if self.stack_inputs.padding_mask is not None:
            out = out * self.stack_inputs.padding_mask[..., None].to(out.dtype)
        return out, aux

    def select_rows(self, index: torch.Tensor) -> StackFunction | None:
        if not self.rows_separable:
            return None
        return replace(
            self,
            injection=None if self.injection is None else self.injection.index_select(0, index),
            stack_inputs=self.stack_inputs.rows(index),
            cache=None if self.cache is None else self.cache.rows(index),
        )


class FixedPointCall:
    """One forward call of an implicit backbone, resolved once: its solver settings (`config`, the model's or a
    validated copy with the call's `solver_overrides`), its cache, the committed length `past_len`, the validated
    `attention_mask` and the `mode` (`solve_mode`), after checking that the call continues what its cache holds
    (batch size, `cache_position`, mask length). A family's `forward` makes one, embeds and injects the input,
    builds its stack inputs and calls the method of the mode, `simultaneous` or `sequential`; `output` packs the
    result. The fixed-point map of the call is `function`.
    """

    def __init__(
        self,
        backbone: ImplicitBackboneMixin,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: ImplicitCache | None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        solver_overrides: dict[str, Any] | None = None,
        cache_position: torch.Tensor | None = None,
    ):
        backbone.validate_inputs(input_ids, inputs_embeds)
        if cache is not None and not isinstance(cache, ImplicitCache):
            raise TypeError(
                f"{CACHE_NAME} must be the model's own cache ({type(backbone.make_cache()).__name__}); "
                f"got {type(cache).__name__}."
            )
        self.backbone = backbone
        self.config = backbone.resolve_config(solver_overrides)
        self.training = backbone.training
        batch, self.seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        self.mode = solve_mode(self.training, cache is not None, self.seq_len, self.config)
        self.use_cache = not self.training and (backbone.config.use_cache if use_cache is None else use_cache)
        self.cache = backbone.make_cache() if cache is None and self.use_cache else cache
        _check_call_continues_cache(self.cache, batch, self.seq_len, cache_position)
        self.past_len = 0 if self.cache is None else self.cache.get_seq_length()
        if self.cache is not None:
            self.cache.reserve(self.seq_len)
        self.attention_mask = _validated_mask(attention_mask, batch, self.seq_len, self.past_len)
        defaults = backbone.config
        self.output_hidden_states = bool(
            getattr(defaults, "output_hidden_states", False) if output_hidden_states is None else output_hidden_states
        )
        self.output_attentions = bool(
            getattr(defaults, "output_attentions", False) if output_attentions is None else output_attentions
        )

    def function(
        self, injection: torch.Tensor | None, stack_inputs: StackInputs, cache: ImplicitCache | None,
        return_states: bool, compiled: bool = False,
    ) -> StackFunction:
        """`z -> (f(z), (states, hidden_states, attentions))`: one evaluation of the stack against the committed
        `cache` (only read), padding positions held at zero; `compiled`: through the backbone's compiled stack
        when no tape is recorded."""
        return StackFunction(self.backbone.evaluate_stack, injection, stack_inputs, cache, return_states,
                             rows_separable=not self.config.stochastic_stack,
                             compiled_evaluate=self.backbone.compiled_evaluate_stack() if compiled else None)

    def _solve(self, f: Callable, embeddings: torch.Tensor, mode: str, start: torch.Tensor | None = None
               ) -> FixedPointResult:
        """Solve from `start` (a warm start) or zeros in `mode` (which picks a reference `inference_loop`'s loop); an
        explicit model evaluates the stack once on `embeddings`."""
        if not self.config.implicit:
            z, aux = f(embeddings)
            return FixedPointResult(z, aux, None)
        settings = SolverSettings.from_config(self.config, training=self.training, mode=mode)
        return solve_fixed_point(f, torch.zeros_like(embeddings) if start is None else start, settings)

    def simultaneous(self, inputs_embeds: torch.Tensor, injection: torch.Tensor | None, stack_inputs: StackInputs
                     ) -> SolvedStack:
        """All new tokens iterate together (training, full-sequence forwards, a simultaneous prefill); the states
        of the fixed point are committed to the cache once."""
        cache = self.cache
        f = self.function(injection, stack_inputs, cache, return_states=cache is not None,
                          compiled=self.config.compile_simultaneous)
        result = self._solve(f, inputs_embeds, "simultaneous")
        states, hidden_states, attentions = result.aux
        if cache is not None:
            cache.commit(states, self.seq_len, fixed_point=result.z[:, -1:])
        return SolvedStack(result.z, result.stats, hidden_states, attentions)

    def sequential(self, inputs_embeds: torch.Tensor, injection: torch.Tensor | None, stack_inputs: StackInputs
                   ) -> SolvedStack:
        """Token by token, as an RNN: each token iterated to its fixed point against the committed states, then
        committed (a cache carries the states even when none is returned)."""
        if self.cache is None:
            self.cache = self.backbone.make_cache()
        cache, outputs, stats, hidden_states, attentions = self.cache, [], [], [], []
        for t in range(self.seq_len):
            token_injection = None if injection is None else injection[:, t : t + 1]
            token_inputs = stack_inputs.token(t, self.past_len)
            start = self._warm_start(token_inputs)
            result = None
            if self.seq_len == 1 and use_decode_graphs(inputs_embeds, self.config):
                result = self._solve_with_graph(token_injection, token_inputs, start, inputs_embeds)
            if result is None:
                f = self.function(token_injection, token_inputs, cache, return_states=True)
                result = self._solve(f, inputs_embeds[:, t : t + 1], "sequential", start)
            states, token_hidden, token_attention = result.aux
            cache.commit(states, 1, fixed_point=result.z)
            outputs.append(result.z)
            stats.append(result.stats)
            hidden_states.append(token_hidden)
            attentions.append(token_attention)
        return SolvedStack(
            torch.cat(outputs, dim=1),
            SolverStats.stack(stats) if self.config.implicit else None,
            _join_tokens(hidden_states, dim=1),
            _join_token_attentions(attentions),
        )

    def _warm_start(self, stack_inputs: StackInputs) -> torch.Tensor | None:
        """The previous token's fixed point when `warm_start` and the cache holds one; zero for padding (whose fixed
        point is zero), so a padded token still converges at once."""
        if not (self.config.warm_start and self.config.implicit) or self.cache.fixed_point is None:
            return None
        start = self.cache.fixed_point
        if stack_inputs.padding_mask is not None:
            start = start * stack_inputs.padding_mask[..., None].to(start.dtype)
        return start

    def _solve_with_graph(
        self, injection: torch.Tensor | None, stack_inputs: StackInputs, start: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
    ) -> FixedPointResult | None:
        """One decode token through the backbone's `DecodeGraphs` (None: this shape runs eagerly)."""
        backbone, cache = self.backbone, self.cache
        static = backbone.static_decode_inputs(stack_inputs, cache, self.attention_mask)
        if static is None:
            return None
        stack_inputs, states = static
        if getattr(backbone, "_decode_graphs", None) is None:
            backbone._decode_graphs = DecodeGraphs()
        # A graph's static cache keeps the token count it was captured with: a family whose step reads the count
        # passes it in its static inputs (Llama's `key_position`).
        seen_tokens = cache.seen_tokens

        def make_function(static_injection, static_inputs, static_states):
            static_cache = backbone.make_cache()
            static_cache.restore(CacheSnapshot(static_states, seen_tokens, None))
            return self.function(static_injection, static_inputs, static_cache, return_states=True)

        return backbone._decode_graphs.solve(
            make_function,
            injection,
            stack_inputs,
            states,
            torch.zeros_like(inputs_embeds) if start is None else start,
            SolverSettings.from_config(self.config, training=False, mode="sequential"),
            capture=self.config.cuda_graph_decoding and inputs_embeds.is_cuda,
            compile_chunks=self.config.compile_decoding,
            weights=tuple(parameter.data_ptr() for parameter in backbone.parameters()),
        )

    def output(self, solved: SolvedStack, return_dict: bool | None) -> ImplicitModelOutput | tuple:
        """The backbone's output; warns about solves that hit the cap at inference (a training cap is part of the
        recipe, and `early_stop=False` asks for a fixed count)."""
        if not self.training and self.config.early_stop:
            _warn_if_not_converged(solved.stats)
        output = ImplicitModelOutput(
            last_hidden_state=solved.hidden,
            **cache_field(self.cache if self.use_cache else None),
            hidden_states=solved.hidden_states,
            attentions=solved.attentions,
            solver_stats=solved.stats,
        )
        return output if return_dict is not False else output.to_tuple()


class ImplicitBackboneMixin:
    """What every implicit backbone shares. Its family provides the model-specific parts, below as methods that raise
    `NotImplementedError`: the cache (`make_cache`), what every evaluation of the stack needs besides `z`
    (`prepare_stack_inputs`: masks, positions, recording flags) and one pass of the layer stack and its final norm
    (`evaluate_stack`); and a `forward` that embeds, injects and solves through a `FixedPointCall`. Requires
    `config`, `embedding_attribute` and `injection` (an `InputInjection`, None when explicit).

    The recorded hidden states and attention maps travel with the states in the solver's auxiliary output, which the
    solver keeps per sample from the same evaluation as the sample's result: what `output_hidden_states=True` returns
    belongs to the evaluation of `f` whose output is `last_hidden_state`.
    """

    # The attribute holding the token embeddings, under transformers' name for the family (`embeddings`, Mamba2;
    # `embed_tokens`, Llama), so that checkpoints and tools see the layout they know.
    embedding_attribute: str

    def get_input_embeddings(self) -> nn.Embedding:
        return getattr(self, self.embedding_attribute)

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        setattr(self, self.embedding_attribute, new_embeddings)

    def make_cache(self) -> ImplicitCache:
        """An empty cache of this family's fixed-point states."""
        raise NotImplementedError

    def prepare_stack_inputs(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        past_len: int,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> StackInputs:
        """Build, once per call, what every evaluation of the stack needs. `attention_mask` is the validated
        `(batch, past_len + seq_len)` mask or None (no padding)."""
        raise NotImplementedError

    def compiled_evaluate_stack(self) -> Callable[..., tuple[torch.Tensor, Any]]:
        """`evaluate_stack` through `torch.compile` (`compile_simultaneous`), made once per backbone: automatic
        dynamic shapes, so that a new sequence length or batch size recompiles once with symbolic sizes, not per
        size; graph breaks allowed (past torch's recompile limit a shape runs eagerly)."""
        if getattr(self, "_compiled_evaluate_stack", None) is None:
            self._compiled_evaluate_stack = compile_stack(self.evaluate_stack)
        return self._compiled_evaluate_stack

    def static_decode_inputs(
        self, stack_inputs: StackInputs, cache: ImplicitCache, attention_mask: torch.Tensor | None
    ) -> tuple[StackInputs, Any] | None:
        """What a decode step through static buffers (`decode_graphs`) copies into them each token: the step's stack
        inputs and the cache states (restored into a cache of this family for the graph's function), with shapes
        that repeat from token to token; None runs the step eagerly. `attention_mask` is the call's validated
        `(batch, past_len + 1)` mask or None. As they are here: fixed-size recurrent states."""
        return stack_inputs, cache.states

    def evaluate_stack(
        self,
        hidden_states: torch.Tensor,
        injection: torch.Tensor | None,
        stack_inputs: StackInputs,
        cache: ImplicitCache | None,
        return_states: bool,
    ) -> tuple[torch.Tensor, tuple[Any, tuple | None, tuple | None]]:
        """One pass of the layer stack and its final norm: `(f(z), (states, hidden_states, attentions))`, the states
        of the new tokens when `return_states`, recorded through a `StackRecorder`. It reads the committed states of
        `cache` and never changes them."""
        raise NotImplementedError

    def inject(self, inputs_embeds: torch.Tensor) -> torch.Tensor | None:
        """The injected input `u`, added at every iteration to every block's input projection; None when the config
        is explicit (also an implicit model's weights run as the explicit model, as `eval.jacobian` compares)."""
        return self.injection(inputs_embeds) if self.config.implicit else None

    # Solver overrides of every training-mode call (under the call's own), for training loops that cannot pass
    # arguments to forward: `transformers.Trainer` with a curriculum (`CurriculumCallback` sets them per phase).
    training_overrides: dict[str, Any] | None = None

    def resolve_config(self, solver_overrides: dict[str, Any] | None) -> ImplicitPreTrainedConfig:
        """The settings of one call: a validated copy with `solver_overrides` (and, training, `training_overrides`),
        or the model's config, validated again only when its fields changed since the last call."""
        if self.training and self.training_overrides:
            solver_overrides = {**self.training_overrides, **(solver_overrides or {})}
        if solver_overrides:
            return self.config.with_overrides(solver_overrides)
        current = dict(vars(self.config))
        if current != getattr(self, "_validated_config_fields", None):
            self.config.validate()
            self._validated_config_fields = current
        return self.config

    def validate_inputs(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None) -> None:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens.dim() < 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"Empty input: expected (batch, seq_len) with both > 0, got shape {tuple(tokens.shape)}.")
        if input_ids is not None:
            low, high = torch.stack([input_ids.min(), input_ids.max()]).tolist()
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"Token ids must lie in [0, {self.config.vocab_size}) (config.vocab_size); got ids in [{low}, {high}]."
                )

    def fixed_point_function(
        self,
        input_ids: torch.LongTensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: ImplicitCache | None = None,
    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, Any]]:
        """The map `f` the solver iterates for these new tokens, after the tokens committed in `cache` (only read):
        `z (batch, seq_len, hidden_size) -> (f(z), (states, hidden_states, attentions))`, the input injected and
        padding positions held at zero, built as `forward` builds it (the states are returned when a cache is given).
        For analyses such as the Jacobian of `f` (`eval.jacobian`), tests, and solvers of one's own."""
        call = FixedPointCall(self, input_ids, inputs_embeds, attention_mask, cache, use_cache=False)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        stack_inputs = self.prepare_stack_inputs(call.attention_mask, position_ids, inputs_embeds, call.past_len)
        return call.function(self.inject(inputs_embeds), stack_inputs, cache, return_states=cache is not None)


class ImplicitPreTrainedModel(PreTrainedModel):
    """What the pretrained-model classes of every family share: gradient checkpointing of the blocks (see
    `ImplicitLayer`), recurrent states (no assisted decoding: they cannot be rolled back) and the initialisation of
    the input injection. A family's subclass sets `config_class`, `base_model_prefix` and `_no_split_modules`, and
    initialises its own modules after calling this `_init_weights`."""

    supports_gradient_checkpointing = True
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, InputInjection):
            module.init_weights()


def _check_prompt_extends_cache(cache: ImplicitCache, input_ids: torch.LongTensor, kwargs: dict[str, Any]) -> None:
    """`generate(prompt, past_key_values=cache)` with a cache that already holds tokens: generate() feeds the first
    forward only the prompt's tokens after the cached ones, so the prompt must be the whole sequence so far (the
    cached tokens, then new ones). A prompt no longer than the cache would be cut to nothing, or to a tail that does
    not follow the cached tokens, and generation would silently run on the wrong context: raise instead.

    How many new tokens generate() found, by what the installed transformers hands over: `next_sequence_length` (the
    prompt's length minus the cache's; None when only the new tokens were passed, with a mask covering the whole
    sequence: `forward` checks that mask), else `cache_position` (older releases: the positions after the cached ones,
    none when the prompt does not extend the cache), else, in a chunked prefill, `position_ids` of the chunk that
    stop short of it (the chunk lies beyond the prompt's end)."""
    past = cache.get_seq_length()
    if kwargs.get("next_sequence_length") is not None:
        new_tokens = kwargs["next_sequence_length"]
        given = f"a prompt of {past + new_tokens} tokens"
    elif kwargs.get("cache_position") is not None:
        new_tokens = kwargs["cache_position"].shape[-1]
        given = f"a prompt of {input_ids.shape[1]} tokens"
    elif kwargs.get("position_ids") is not None and kwargs["position_ids"].shape[-1] < input_ids.shape[-1]:
        new_tokens, given = 0, "a prompt that ends before the cached tokens do"
    else:
        return
    if new_tokens > 0:
        return
    raise ValueError(
        f"generate() got a cache that holds {_cache_contents(cache)} and {given}, which does not extend them: "
        "with a cache, generate() runs only the tokens after the cached ones. To continue the cached sequences, pass "
        f"the whole sequence so far (the {past} cached tokens, then the new ones, e.g. `output.sequences`); for a new "
        "prompt, pass no cache (or a fresh one)."
    )


# transformers' StopStringCriteria reads the vocabulary through this probe text: a tokenizer that cannot encode it (a
# word-level vocabulary turns it into `<unk>`) cannot use it.
_STOP_STRING_PROBE = "abcdef"


def _stop_strings_probe_cleanly(tokenizer: Any) -> bool:
    ids = tokenizer(_STOP_STRING_PROBE, add_special_tokens=False)["input_ids"]
    return _STOP_STRING_PROBE in tokenizer.decode(ids)


class DecodedStopStrings(StoppingCriteria):
    """`generate(stop_strings=...)` for tokenizers transformers' `StopStringCriteria` cannot probe: a row stops when
    one of `stop_strings` appears in the decoded text and ends in its newest token. Each step decodes only the last
    few tokens of each row (enough for the longest stop string, as every token decodes to at least one character)."""

    def __init__(self, tokenizer: Any, stop_strings: str | list[str]):
        self.tokenizer = tokenizer
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        self.lookback = max(len(text) for text in self.stop_strings) + 1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = []
        for row in input_ids[:, -self.lookback:].tolist():
            text, before = self.tokenizer.decode(row), self.tokenizer.decode(row[:-1])
            done.append(any(text.count(stop) > before.count(stop) for stop in self.stop_strings))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class ImplicitCausalLMMixin(RecurrentGenerationMixin):
    """Causal-LM head, loss and `generate()` plumbing shared by implicit LMs: the backbone (`backbone_class`, under
    `base_model_prefix`) and a bias-free `lm_head`, tied to the input embeddings by the family's `_tied_weights_keys`.
    """

    backbone_class: type[nn.Module]

    def __init__(self, config: ImplicitPreTrainedConfig):
        super().__init__(config)
        setattr(self, self.base_model_prefix, self.backbone_class(config))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.base_model.set_input_embeddings(new_embeddings)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args: Any, **kwargs: Any) -> dict[str, Any]:
        cache = kwargs.get(CACHE_NAME)
        if isinstance(cache, ImplicitCache) and cache.get_seq_length() > 0:
            _check_prompt_extends_cache(cache, input_ids, kwargs)
        # generate() builds no cache for us (see compat); give its first forward an empty one, so that the prompt is
        # solved as a prefill (`prefill_mode`), not as a plain forward (`inference_mode`). It is built here, after
        # the inputs were expanded for beams and `num_return_sequences`, and generate() carries it on from the outputs.
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if model_inputs.get(CACHE_NAME) is None and model_inputs.get("use_cache", True) is not False:
            model_inputs[CACHE_NAME] = self.base_model.make_cache()
        return model_inputs

    def generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None, **kwargs: Any) -> Any:
        """transformers' `generate`; `stop_strings` given with a tokenizer whose vocabulary transformers cannot probe
        (the word-level tokenizers of the bundled models) are matched on the decoded text (`DecodedStopStrings`)."""
        tokenizer = kwargs.get("tokenizer")
        configured = getattr(generation_config or self.generation_config, "stop_strings", None)
        stop_strings = kwargs.get("stop_strings") or configured
        if stop_strings and tokenizer is not None and not _stop_strings_probe_cleanly(tokenizer):
            kwargs.pop("stop_strings", None)
            if configured:
                generation_config = copy.deepcopy(generation_config or self.generation_config)
                generation_config.stop_strings = None
            criteria = kwargs.get("stopping_criteria") or StoppingCriteriaList()
            kwargs["stopping_criteria"] = StoppingCriteriaList([*criteria, DecodedStopStrings(tokenizer, stop_strings)])
        return super().generate(inputs, generation_config=generation_config, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        # transformers maps only the saved class (and the config) in `auto_map`; map `AutoModel` to the backbone too,
        # so that `AutoModel.from_pretrained(folder, trust_remote_code=True)` works on every saved causal LM.
        if self._auto_class is not None:
            backbone = type(self.base_model)
            module = backbone.__module__.rsplit(".", 1)[-1]
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": f"{module}.{backbone.__name__}"}
        super().save_pretrained(save_directory, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: ImplicitCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: ImplicitCache | None = None,
        solver_overrides: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> ImplicitCausalLMOutput | tuple:
        """`cache` (transformers >= 5.24's name) and `past_key_values` (the older one) are the same argument. Other
        keywords reach the backbone (a family's own arguments, such as Mamba2's `noise_generator`) and the loss, as
        in transformers' causal LMs; a `cache_position` keyword (older transformers' generate passes one) must number
        the new tokens right after the cached ones: it is checked, not otherwise used."""
        outputs = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache_argument(cache, past_key_values),
            use_cache=use_cache,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            solver_overrides=solver_overrides,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = at_least_float32(self.lm_head(hidden[:, keep].to(self.lm_head.weight.dtype)))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = ImplicitCausalLMOutput(
            loss=loss,
            logits=logits,
            **cache_field(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            solver_stats=outputs.solver_stats,
        )
        return output if return_dict is not False else output.to_tuple()
