"""Implicit Llama: a stack of Llama-3-style blocks iterated to a fixed point, as a transformers causal LM.

f(z, x) = norm(blocks(z, u)), u = injection(embed(x)) (the injection holds its own RMSNorm, then a Linear) added to
every block's query/key/value projections
(`Attn(z W_qkv + x W_inp)`, before the rotary embedding). With `implicit=False` the same modules give the explicit
Llama (weights and outputs interchangeable with transformers' `LlamaForCausalLM`).

In sequential mode the keys/values of the token being solved are recomputed from every iterate and attended
together with the committed past; only the converged keys/values are committed to the `ImplicitLlamaCache`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .compat import cache_argument
from .configuration_implicit_llama import ImplicitLlamaConfig
from .modeling_implicit_utils import (
    FixedPointCall,
    ImplicitBackboneMixin,
    ImplicitCache,
    ImplicitCausalLMMixin,
    ImplicitLayer,
    ImplicitModelOutput,
    ImplicitPreTrainedModel,
    RMSNorm,
    StackInputs,
    StackRecorder,
    make_injection,
)

KeyValue = tuple[torch.Tensor, torch.Tensor]


class LengthExtrapolationWarning(UserWarning):
    """Positions beyond `max_position_embeddings`: the rotary embedding extrapolates past the trained context."""


class KeyValueBuffer(NamedTuple):
    """One layer of an `ImplicitLlamaCache`: `(batch, num_key_value_heads, capacity, head_dim)` key and value storage
    whose first `length` positions are committed; the positions after them are scratch for the tokens being solved.
    A 0-dim tensor `length` is a static decode step's (`static_decode_inputs`): the token's keys/values are written
    at that position and the whole buffers attended to, under a mask of the same width."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int | torch.Tensor


class ImplicitLlamaCache(ImplicitCache):
    """Fixed-point key/value cache for sequential generation.

    `states = (keys_0, values_0, keys_1, values_1, ...)`, one pair per layer, each `(batch, num_key_value_heads,
    seq_len, head_dim)` in the model dtype, keys already rotated: views of the committed part of per-layer buffers
    that keep room after it. While the solver iterates on new tokens, each evaluation writes their keys/values (from
    the current iterate) into that room and attends to the buffer up to them, so the committed past is neither copied
    nor written; `commit` writes the converged keys/values once. Room grows geometrically (`reserve`) and starts
    zeroed, so that a masked position never holds a NaN (a static decode step attends over the whole buffers, and
    zero attention weight times NaN is NaN). A token's entries depend only on itself and earlier tokens, so the cache
    can be cropped.
    """

    def __init__(self) -> None:
        self._buffers: tuple[torch.Tensor, ...] | None = None
        super().__init__()

    @property
    def states(self) -> tuple[torch.Tensor, ...] | None:
        if self._buffers is None:
            return None
        return tuple(buffer[:, :, : self.seen_tokens] for buffer in self._buffers)

    @states.setter
    def states(self, value: tuple[torch.Tensor, ...] | None) -> None:
        self._buffers = None if value is None else tuple(value)

    def _num_layers(self) -> int:
        return len(self._buffers) // 2

    def _apply_to_batch(self, fn: Any) -> None:
        # The whole buffers, so that a reordered or selected cache keeps its room for the tokens being solved.
        if self._buffers is not None:
            self._buffers = tuple(fn(buffer) for buffer in self._buffers)
        if self.fixed_point is not None:
            self.fixed_point = fn(self.fixed_point)

    @property
    def capacity(self) -> int:
        """Positions the buffers hold, committed and scratch."""
        return 0 if self._buffers is None else self._buffers[0].shape[2]

    def reserve(self, num_tokens: int) -> None:
        """Make room for `num_tokens` tokens after the committed ones (at least doubling, so that generation
        reallocates O(log length) times)."""
        needed = self.seen_tokens + num_tokens
        if self._buffers is None or needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        grown = []
        for buffer in self._buffers:
            new = buffer.new_zeros(*buffer.shape[:2], capacity, buffer.shape[3])
            new[:, :, : self.seen_tokens] = buffer[:, :, : self.seen_tokens]
            grown.append(new)
        self._buffers = tuple(grown)

    def _store(self, new_states: tuple[torch.Tensor, ...], num_tokens: int) -> None:
        if self._buffers is None:
            batch, heads, _, head_dim = new_states[0].shape
            self._buffers = tuple(s.new_zeros(batch, heads, 2 * num_tokens, head_dim) for s in new_states)
        else:
            self.reserve(num_tokens + 1)  # and one more: the next token's iterations write without a copy
        start = self.seen_tokens
        for buffer, new in zip(self._buffers, new_states):
            buffer[:, :, start : start + num_tokens] = new

    def layer(self, index: int) -> KeyValueBuffer | None:
        """The key/value buffers of layer `index` and their committed length, or None while the cache is empty."""
        if self._buffers is None:
            return None
        return KeyValueBuffer(self._buffers[2 * index], self._buffers[2 * index + 1], self.seen_tokens)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative number of tokens to remove, as for transformers' caches."
            )
        if tokens_to_remove == 0 or self._buffers is None:
            return
        self.seen_tokens = max(self.seen_tokens + tokens_to_remove, 0)  # the dropped positions become scratch
        self.fixed_point = None  # the fixed point of the new last token is not kept: the next solve starts cold

    @property
    def is_croppable(self) -> bool:
        return True


@dataclass
class LlamaStackInputs(StackInputs):
    """`StackInputs` plus the attention mask in the form the attention implementation takes (None: causal by
    `is_causal` or nothing to mask) and the rotary `(cos, sin)` of the new tokens, `(batch or 1, seq_len, head_dim)`.
    `key_position` (0-dim) marks a static decode step (`ImplicitLlamaModel.static_decode_inputs`): the token's
    keys/values go to that position of the cache's buffers, and the mask covers the buffers' whole width."""

    attention_mask: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    key_position: torch.Tensor | None = None

    def token(self, index: int, past_len: int) -> LlamaStackInputs:
        visible = past_len + index + 1
        mask = self.attention_mask
        if mask is not None:
            mask = mask[:, :visible] if mask.dim() == 2 else mask[:, :, index : index + 1, :visible]
        cos, sin = self.position_embeddings
        return replace(
            self,
            padding_mask=None if self.padding_mask is None else self.padding_mask[:, index : index + 1],
            attention_mask=mask,
            position_embeddings=(cos[:, index : index + 1], sin[:, index : index + 1]),
        )


def _with_past(past: KeyValueBuffer, key: torch.Tensor, value: torch.Tensor) -> KeyValue:
    """The committed keys/values followed by the new ones. Without a tape, the new ones go into the buffers' scratch
    room and the result is a view: no copy of the past per evaluation. With a tape (gradients through a sequential
    solve), a concatenation: an in-place write would clobber what autograd saved from the previous evaluation."""
    if isinstance(past.length, torch.Tensor):  # static: shapes that do not change from token to token
        position = past.length.view(1)
        past.keys.index_copy_(2, position, key)
        past.values.index_copy_(2, position, value)
        return past.keys, past.values
    end = past.length + key.shape[2]
    recording = torch.is_grad_enabled() and (key.requires_grad or value.requires_grad)
    if end <= past.keys.shape[2] and not recording:
        past.keys[:, :, past.length : end] = key
        past.values[:, :, past.length : end] = value
        return past.keys[:, :, :end], past.values[:, :, :end]
    committed = slice(0, past.length)
    return (torch.cat([past.keys[:, :, committed], key], dim=2),
            torch.cat([past.values[:, :, committed], value], dim=2))


def _causal_mask(
    attention_mask: torch.Tensor | None, seq_len: int, past_len: int, width: int, dtype: torch.dtype,
    device: torch.device, implementation: str,
) -> torch.Tensor:
    """The mask of `seq_len` new tokens after `past_len` committed ones over `width >= past_len + seq_len` keys (wider:
    a static decode step's buffers, the keys after the new tokens masked out): sdpa's boolean form or eager's
    additive one. `attention_mask` is the `(batch, past_len + seq_len)` padding mask or None."""
    query_positions = torch.arange(past_len, past_len + seq_len, device=device)[:, None]
    key_positions = torch.arange(width, device=device)[None, :]
    allowed = (key_positions <= query_positions)[None, None]
    if attention_mask is not None:
        padding = F.pad(attention_mask.bool(), (0, width - attention_mask.shape[1]))
        # A padding query sees only itself: no row is fully masked (sdpa would return NaN), and its output is
        # discarded anyway (padding positions of z are held at zero).
        allowed = (allowed & padding[:, None, None, :]) | (key_positions == query_positions)
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class ImplicitLlamaAttention(nn.Module):
    """Grouped-query attention (transformers/Llama weight layout) that adds the injected input to its query/key/value
    projections and attends to the committed keys/values without writing them."""

    def __init__(self, config: ImplicitLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config  # the attention interface reads `config._attn_implementation`
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        query_width = config.num_attention_heads * self.head_dim
        key_value_width = config.num_key_value_heads * self.head_dim
        self.injection_split = (query_width, key_value_width, key_value_width)
        self.q_proj = nn.Linear(config.hidden_size, query_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, key_value_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, key_value_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(query_width, config.hidden_size, bias=config.attention_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        injection: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_value: KeyValueBuffer | None,
        output_attentions: bool = False,
        return_states: bool = True,
    ) -> tuple[torch.Tensor, KeyValue | None, torch.Tensor | None]:
        """Returns the output, the new tokens' keys/values (with `return_states`; None otherwise, so that a sharded
        layer, FSDP2, returns no view it would have to guard) and, with `output_attentions` (eager attention, whatever
        the configured implementation), the attention weights `(batch, heads, new, past + new)`."""
        batch, seq_len, _ = hidden_states.shape
        query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if injection is not None:
            injected_query, injected_key, injected_value = injection.split(self.injection_split, dim=-1)
            query, key, value = query + injected_query, key + injected_key, value + injected_value
        shape = (batch, seq_len, -1, self.head_dim)
        query, key, value = (t.view(shape).transpose(1, 2) for t in (query, key, value))
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        new_key_value = (key, value)
        if past_key_value is not None:
            key, value = _with_past(past_key_value, key, value)

        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        return self.o_proj(output.reshape(batch, seq_len, -1)), new_key_value if return_states else None, weights


class ImplicitLlamaDecoderLayer(ImplicitLayer):
    """Pre-norm block: `h = z + attn(norm(z), injection)`, then `h + mlp(norm(h))` (the MLP reads the stream after
    attention)."""

    def __init__(self, config: ImplicitLlamaConfig, layer_idx: int):
        super().__init__(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attn = ImplicitLlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        injection: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_value: KeyValueBuffer | None,
        output_attentions: bool = False,
        return_states: bool = True,
    ) -> tuple[torch.Tensor, KeyValue | None, torch.Tensor | None]:
        dtype = self.input_layernorm.weight.dtype
        residual = self.residual(hidden_states)
        normed = self.input_layernorm(hidden_states.to(dtype))
        attended, key_value, weights = self.self_attn(
            normed, injection, position_embeddings, attention_mask, past_key_value, output_attentions, return_states
        )
        hidden_states = residual + attended
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states.to(dtype)))
        return hidden_states, key_value, weights


class ImplicitLlamaPreTrainedModel(ImplicitPreTrainedModel):
    config_class = ImplicitLlamaConfig
    config: ImplicitLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["ImplicitLlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True


class ImplicitLlamaModel(ImplicitBackboneMixin, ImplicitLlamaPreTrainedModel):
    """Embeddings, the shared input injection, the Llama stack, its final norm and the rotary embedding, solved to a
    fixed point `z* = f(z*, u)`, `f(z, u) = norm(blocks(z, u))`; with `implicit=False`, one pass of the stack on the
    embeddings (transformers' `LlamaModel`).

    Positions default to `past + index` without padding and count only real tokens with left padding (the cumulative
    sum of `attention_mask`), so a padded sequence sees the positions it would see alone.
    """

    embedding_attribute = "embed_tokens"

    def __init__(self, config: ImplicitLlamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.injection = make_injection(config, config.qkv_size)  # added to every block's q/k/v projections
        self.layers = nn.ModuleList(
            [ImplicitLlamaDecoderLayer(config, index) for index in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: ImplicitLlamaCache | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: ImplicitLlamaCache | None = None,
        solver_overrides: dict | None = None,
        **kwargs,
    ) -> ImplicitModelOutput | tuple:
        """`cache` (transformers >= 5.24's name) and `past_key_values` (the older one) are the same argument; the
        call solves in the mode `solve_mode` picks (training: simultaneous; a cache passed in: a sequential step or a
        prefill per `prefill_mode`; otherwise `inference_mode`), with the call's `solver_overrides` (see
        `SOLVER_OVERRIDE_FIELDS`) and `model.config` left alone. `output_hidden_states=True` returns the per-layer
        hidden states of the evaluation of `f` whose output is `last_hidden_state` (see `StackRecorder`),
        `output_attentions=True` that evaluation's attention maps, computed with eager attention; in sequential mode
        each token's are joined along the sequence (attention rows padded with zeros for the keys a token cannot
        see). Training with `phantom_damping < 1` returns a damped mix of the last two evaluations; the recorded ones
        are the last's."""
        call = FixedPointCall(self, input_ids, inputs_embeds, attention_mask, cache_argument(cache, past_key_values),
                              use_cache, output_hidden_states, output_attentions, solver_overrides,
                              kwargs.get("cache_position"))
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        injection = self.inject(inputs_embeds)
        # Positions, the causal + padding mask and the rotary embedding, built once for every solver iteration.
        stack_inputs = self.prepare_stack_inputs(call.attention_mask, position_ids, inputs_embeds, call.past_len,
                                                 call.output_hidden_states, call.output_attentions)
        # All new tokens at once, or token by token, each token's keys/values iterated with it and then committed.
        if call.mode == "simultaneous":
            solved = call.simultaneous(inputs_embeds, injection, stack_inputs)
        else:
            solved = call.sequential(inputs_embeds, injection, stack_inputs)
        return call.output(solved, return_dict)

    def make_cache(self) -> ImplicitLlamaCache:
        return ImplicitLlamaCache()

    def _position_ids(
        self, attention_mask: torch.Tensor | None, position_ids: torch.LongTensor | None, batch: int, seq_len: int,
        past_len: int, device: torch.device,
    ) -> torch.LongTensor:
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[1] != seq_len or position_ids.shape[0] not in (1, batch):
                raise ValueError(
                    f"position_ids must have shape (batch={batch} or 1, seq_len={seq_len}); "
                    f"got {tuple(position_ids.shape)}."
                )
            last_position = int(position_ids.max())
        elif attention_mask is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=device)[None]
            last_position = past_len + seq_len - 1
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
            last_position = past_len + seq_len - 1  # an upper bound; exact only when it matters (no sync otherwise)
            if last_position >= self.config.max_position_embeddings:
                last_position = int(position_ids.max())
        if last_position >= self.config.max_position_embeddings:
            warnings.warn(
                f"Positions beyond max_position_embeddings ({self.config.max_position_embeddings}): the rotary "
                "embedding extrapolates past the context the model was trained on.",
                LengthExtrapolationWarning,
                stacklevel=4,
            )
        return position_ids

    def _attention_mask(
        self, attention_mask: torch.Tensor | None, seq_len: int, past_len: int, dtype: torch.dtype,
        device: torch.device, implementation: str,
    ) -> torch.Tensor | None:
        """The causal + padding mask of the new tokens over all `past_len + seq_len` keys, in the form the attention
        implementation takes: flash attention the 2D padding mask (causality by `is_causal`), sdpa a boolean mask
        (None when its `is_causal` suffices), eager an additive float mask."""
        if "flash" in implementation:
            return attention_mask
        if attention_mask is None and (seq_len == 1 or (past_len == 0 and implementation == "sdpa")):
            return None
        return _causal_mask(attention_mask, seq_len, past_len, past_len + seq_len, dtype, device, implementation)

    def static_decode_inputs(
        self, stack_inputs: LlamaStackInputs, cache: ImplicitLlamaCache, attention_mask: torch.Tensor | None
    ) -> tuple[LlamaStackInputs, tuple[torch.Tensor, ...]] | None:
        """A decode step over the whole key/value buffers, whose width changes only when the cache grows (`reserve`
        doubles it): the step's mask widened to the buffers (positions after the token masked out) and the token's
        position as a tensor (`KeyValueBuffer`). None (eager) for attention maps and flash attention."""
        implementation = self.config._attn_implementation
        if stack_inputs.output_attentions or "flash" in implementation or cache.states is None:
            return None
        buffers = cache._buffers
        mask = _causal_mask(attention_mask, 1, cache.seen_tokens, cache.capacity, buffers[0].dtype,
                            buffers[0].device, implementation)
        position = torch.tensor(cache.seen_tokens, device=buffers[0].device)
        return replace(stack_inputs, attention_mask=mask, key_position=position), buffers

    def prepare_stack_inputs(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        past_len: int,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> LlamaStackInputs:
        batch, seq_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        position_ids = self._position_ids(attention_mask, position_ids, batch, seq_len, past_len, device)
        # Attention maps come from eager attention, whatever the configured implementation (as in transformers).
        implementation = "eager" if output_attentions else self.config._attn_implementation
        return LlamaStackInputs(
            padding_mask=None if attention_mask is None else attention_mask[:, -seq_len:],
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            attention_mask=self._attention_mask(
                attention_mask, seq_len, past_len, inputs_embeds.dtype, device, implementation
            ),
            position_embeddings=self.rotary_emb(inputs_embeds, position_ids),
        )

    def evaluate_stack(
        self,
        hidden_states: torch.Tensor,
        injection: torch.Tensor | None,
        stack_inputs: LlamaStackInputs,
        cache: ImplicitLlamaCache | None,
        return_states: bool,
    ) -> tuple[torch.Tensor, tuple[tuple[torch.Tensor, ...] | None, tuple | None, tuple | None]]:
        """One pass of the stack and the final norm; attends to the committed keys/values in `cache` (the new tokens'
        go into its scratch room, the committed ones are never written). Returns `(f(z), (states, hidden_states,
        attentions))`: the new tokens' keys/values when `return_states`, and what `StackRecorder` records."""
        new_states: list[torch.Tensor] = []
        recorder = StackRecorder(stack_inputs, hidden_states)
        for index, layer in enumerate(self.layers):
            past = None if cache is None else cache.layer(index)
            if past is not None and stack_inputs.key_position is not None:
                past = past._replace(length=stack_inputs.key_position)
            hidden_states, key_value, weights = layer(
                hidden_states,
                injection,
                stack_inputs.position_embeddings,
                stack_inputs.attention_mask,
                past,
                stack_inputs.output_attentions,
                return_states,
            )
            if return_states:
                new_states.extend(key_value)
            recorder.block(hidden_states, weights)
        hidden_states = self.norm(hidden_states)
        return hidden_states, (tuple(new_states) if return_states else None, *recorder.finish(hidden_states))


class ImplicitLlamaForCausalLM(ImplicitCausalLMMixin, ImplicitLlamaPreTrainedModel, GenerationMixin):
    """Implicit Llama language model: `ImplicitLlamaModel` and a head tied to its embeddings. Full-sequence forwards
    are solved in simultaneous mode (or sequential, per `config.inference_mode`); `generate()` prefills per
    `config.prefill_mode` and decodes token by token, iterating each token (its keys/values included) to its fixed
    point against the committed `ImplicitLlamaCache`."""

    backbone_class = ImplicitLlamaModel
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}


__all__ = [
    "ImplicitLlamaCache",
    "ImplicitLlamaForCausalLM",
    "ImplicitLlamaModel",
    "ImplicitLlamaPreTrainedModel",
    "LengthExtrapolationWarning",
]
