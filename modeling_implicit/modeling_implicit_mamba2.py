"""Implicit Mamba2: a stack of Mamba2 blocks iterated to a fixed point, as a transformers causal LM.

f(z, x) = norm_f(blocks(z, u)), u = injection(embed(x)) (the injection holds its own RMSNorm, then a Linear) added to
every block's in-projection output.
With `implicit=False` the same modules give the explicit Mamba2: no injection, one pass from the embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init

from .compat import cache_argument
from .configuration_implicit_mamba2 import ImplicitMamba2Config
from .kernels import causal_conv1d_silu, mamba2_decode_step, ssd_chunk_scan
from .mamba2_ops import gated_rms_norm, gaussian_noise, time_step
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
from .numerics import at_least_float32

Mamba2States = tuple[torch.Tensor, torch.Tensor]


class ImplicitMamba2Cache(ImplicitCache):
    """Fixed-point states of every layer for sequential generation.

    `states = (conv_states, ssm_states)` with shapes `(batch, num_layers, conv_dim, conv_kernel - 1)` (the last inputs
    of each layer's convolution, model dtype) and `(batch, num_layers, num_heads, head_dim, state_size)` (float32).
    Both are replaced as a whole at each commit: a recurrent state summarises the whole past.
    """

    def _store(self, new_states: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]], num_tokens: int) -> None:
        # The stack returns per-layer states (no copy per solver iteration); they are stacked once, here.
        self.states = tuple(torch.stack(per_layer, dim=1) for per_layer in new_states)

    def _num_layers(self) -> int:
        return self.states[0].shape[1]


class GatedRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(hidden_states, gate, self.weight, self.variance_epsilon, self.group_size)


class ImplicitMamba2Mixer(nn.Module):
    """Mamba2 mixer (transformers/mamba weight layout) that accepts an injected input and never writes states.

    Padding (mask 0) is skipped inside the recurrence: its projections, convolution outputs and time steps are
    zeroed, so it neither feeds nor decays the SSM state, and its output is zero.
    """

    def __init__(self, config: ImplicitMamba2Config):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.state_size = config.state_size
        self.n_groups = config.n_groups
        self.intermediate_size = config.intermediate_size
        self.conv_dim = config.conv_dim
        self.chunk_size = config.chunk_size
        self.time_step_limit = tuple(config.time_step_limit)
        self.in_proj = nn.Linear(config.hidden_size, config.in_proj_size, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=config.conv_kernel,
            groups=self.conv_dim,
            padding=config.conv_kernel - 1,
            bias=config.use_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(
            self.intermediate_size, self.intermediate_size // self.n_groups, eps=config.layer_norm_epsilon
        )
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.use_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        injection: torch.Tensor | None,
        mask: torch.Tensor | None,
        conv_state: torch.Tensor | None,
        ssm_state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, Mamba2States]:
        batch, seq_len, _ = hidden_states.shape
        keep = None if mask is None else mask[..., None].to(hidden_states.dtype)
        projected = self.in_proj(hidden_states)
        if injection is not None:
            projected = projected + injection
        if keep is not None:
            projected = projected * keep
        gate, xbc, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        if seq_len == 1:
            y, new_conv_state, new_ssm_state = self._step(xbc[:, 0], dt[:, 0], mask, conv_state, ssm_state)
        else:
            y, new_conv_state, new_ssm_state = self._scan(xbc, dt, mask, keep, conv_state, ssm_state)
        y = self.norm(y.reshape(batch, seq_len, self.intermediate_size), gate)
        out = self.out_proj(y.to(hidden_states.dtype))
        if keep is not None:
            out = out * keep
        return out, (new_conv_state, new_ssm_state)

    def _scan(
        self,
        xbc: torch.Tensor,
        dt: torch.Tensor,
        mask: torch.Tensor | None,
        keep: torch.Tensor | None,
        conv_state: torch.Tensor | None,
        ssm_state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Convolution and chunked scan over a sequence (simultaneous mode, prefill)."""
        batch, seq_len, _ = xbc.shape
        xbc, new_conv_state = causal_conv1d_silu(
            xbc.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias, conv_state
        )
        xbc = xbc.transpose(1, 2)
        if keep is not None:
            xbc = xbc * keep
        group_width = self.n_groups * self.state_size
        x, B, C = xbc.split([self.intermediate_size, group_width, group_width], dim=-1)
        y, new_ssm_state = ssd_chunk_scan(
            x.reshape(batch, seq_len, self.num_heads, self.head_dim),
            time_step(dt, self.dt_bias, self.time_step_limit, mask),
            -torch.exp(at_least_float32(self.A_log)),
            B.reshape(batch, seq_len, self.n_groups, self.state_size),
            C.reshape(batch, seq_len, self.n_groups, self.state_size),
            self.D,
            self.chunk_size,
            initial_state=ssm_state,
        )
        return y, new_conv_state, new_ssm_state

    def _step(
        self,
        xbc: torch.Tensor,
        dt: torch.Tensor,
        mask: torch.Tensor | None,
        conv_state: torch.Tensor | None,
        ssm_state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token against the committed states (sequential mode), which it reads and never writes."""
        batch = xbc.shape[0]
        if conv_state is None:
            conv_state = xbc.new_zeros(batch, self.conv_dim, self.conv1d.kernel_size[0] - 1)
        if ssm_state is None:
            ssm_state = xbc.new_zeros(batch, self.num_heads, self.head_dim, self.state_size, dtype=torch.float32)
        return mamba2_decode_step(
            xbc,
            dt=dt,
            keep=None if mask is None else mask[:, 0],
            conv_state=conv_state,
            conv_weight=self.conv1d.weight.squeeze(1),
            conv_bias=self.conv1d.bias,
            dt_bias=self.dt_bias,
            A_log=self.A_log,
            D=self.D,
            ssm_state=ssm_state,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            state_size=self.state_size,
            n_groups=self.n_groups,
            time_step_limit=self.time_step_limit,
        )


@dataclass
class Mamba2StackInputs(StackInputs):
    """`StackInputs` plus the noise study's: `noise_generator`, the random generator its noise is drawn from (None:
    torch's default), and, when the study is on, `history`: the `(batch, past_len + seq_len)` 0/1 mask of the cached
    and new tokens (None: no padding). A step adds noise only to samples that already committed a real token, so a
    left-padded sample's first real token is, as without padding, no noisy step."""

    noise_generator: torch.Generator | None = None
    history: torch.Tensor | None = None


@dataclass
class StepNoise:
    """The noise study on one single-token step (see `ImplicitMamba2Config`): latent noise on a mixer's input, state
    noise on the states a step would commit. `rows` masks out padded samples."""

    config: ImplicitMamba2Config
    generator: torch.Generator | None
    rows: torch.Tensor | None

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_noise(x, self.config.latent_noise_db, self.config.noise_mode, self.generator, self.rows)

    def state(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_noise(x, self.config.state_noise_db, self.config.noise_mode, self.generator, self.rows)


class ImplicitMamba2Block(ImplicitLayer):
    """Pre-norm residual block: `z + mixer(norm(z), injection)`."""

    def __init__(self, config: ImplicitMamba2Config):
        super().__init__(config)
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = ImplicitMamba2Mixer(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        injection: torch.Tensor | None,
        mask: torch.Tensor | None,
        conv_state: torch.Tensor | None,
        ssm_state: torch.Tensor | None,
        noise: StepNoise | None = None,
        return_states: bool = True,
    ) -> tuple[torch.Tensor, Mamba2States | None]:
        """The block's output and, with `return_states`, its candidate states (views into the mixer's results; None
        otherwise, so that a sharded block, FSDP2, returns no view it would have to guard)."""
        residual = self.residual(hidden_states)
        normed = self.norm(hidden_states.to(self.norm.weight.dtype))
        if noise is not None:
            normed = noise.latent(normed)
        mixed, states = self.mixer(normed, injection, mask, conv_state, ssm_state)
        return residual + mixed, states if return_states else None


class ImplicitMamba2PreTrainedModel(ImplicitPreTrainedModel):
    config_class = ImplicitMamba2Config
    config: ImplicitMamba2Config
    base_model_prefix = "backbone"
    _no_split_modules = ["ImplicitMamba2Block"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ImplicitMamba2Mixer):
            config = self.config
            low, high = config.A_init_range
            init.copy_(module.A_log, torch.log(torch.empty(module.num_heads).uniform_(low, high)))
            init.ones_(module.D)
            dt = torch.exp(
                torch.rand(module.num_heads) * (math.log(config.time_step_max) - math.log(config.time_step_min))
                + math.log(config.time_step_min)
            ).clamp(min=config.time_step_floor)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
            # PyTorch's default Linear bound 1/sqrt(fan_in), divided by sqrt(num_layers) for the GPT-2 scheme.
            bound = module.out_proj.in_features**-0.5
            if config.rescale_prenorm_residual:
                bound /= math.sqrt(config.num_hidden_layers)
            init.uniform_(module.out_proj.weight, -bound, bound)


class ImplicitMamba2Model(ImplicitBackboneMixin, ImplicitMamba2PreTrainedModel):
    """Embeddings, the shared input injection, the Mamba2 stack and its final norm, solved to a fixed point
    `z* = f(z*, u)`, `f(z, u) = norm_f(blocks(z, u))`; with `implicit=False`, one pass of the stack on the embeddings.
    """

    embedding_attribute = "embeddings"

    def __init__(self, config: ImplicitMamba2Config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.injection = make_injection(config, config.in_proj_size)  # added to every block's in_proj output
        self.layers = nn.ModuleList([ImplicitMamba2Block(config) for _ in range(config.num_hidden_layers)])
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: ImplicitMamba2Cache | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: ImplicitMamba2Cache | None = None,
        noise_generator: torch.Generator | None = None,
        solver_overrides: dict | None = None,
        **kwargs,
    ) -> ImplicitModelOutput | tuple:
        """`cache` (transformers >= 5.24's name) and `past_key_values` (the older one) are the same argument; the
        call solves in the mode `solve_mode` picks (training: simultaneous; a cache passed in: a sequential step or a
        prefill per `prefill_mode`; otherwise `inference_mode`). `solver_overrides` (`{"inference_mode":
        "sequential", "eval_max_iterations": 8, ...}`, see `SOLVER_OVERRIDE_FIELDS`) sets how this call finds the
        fixed point, leaving `model.config` alone. `noise_generator` draws the noise of the noise study (see
        `ImplicitMamba2Config`). `output_hidden_states=True` returns the per-layer hidden states of the evaluation of
        `f` whose output is `last_hidden_state` (see `StackRecorder`); in sequential mode each token's are joined along
        the sequence. Mamba2 has no positions and no attention maps: `position_ids` and `output_attentions` are
        accepted and ignored."""
        call = FixedPointCall(self, input_ids, inputs_embeds, attention_mask, cache_argument(cache, past_key_values),
                              use_cache, output_hidden_states, output_attentions, solver_overrides,
                              kwargs.get("cache_position"))
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        injection = self.inject(inputs_embeds)
        stack_inputs = self.prepare_stack_inputs(call.attention_mask, None, inputs_embeds, call.past_len,
                                                 call.output_hidden_states, noise_generator=noise_generator)
        # All new tokens at once, or token by token against the committed states (the RNN).
        if call.mode == "simultaneous":
            solved = call.simultaneous(inputs_embeds, injection, stack_inputs)
        else:
            solved = call.sequential(inputs_embeds, injection, stack_inputs)
        return call.output(solved, return_dict)

    def make_cache(self) -> ImplicitMamba2Cache:
        return ImplicitMamba2Cache()

    def prepare_stack_inputs(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        past_len: int,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        noise_generator: torch.Generator | None = None,
    ) -> Mamba2StackInputs:
        seq_len = inputs_embeds.shape[1]
        return Mamba2StackInputs(
            None if attention_mask is None else attention_mask[:, -seq_len:],
            output_hidden_states=output_hidden_states,
            noise_generator=noise_generator,
            history=attention_mask if self.config.noise_active else None,
        )

    def _step_noise(self, stack_inputs: Mamba2StackInputs, cache: ImplicitMamba2Cache | None, seq_len: int):
        """The noise study acts on steps against committed states only (the fork's single-token path), of the
        samples that committed a real token before this one."""
        if not self.config.noise_active or seq_len != 1 or cache is None or cache.states is None:
            return None
        rows = None
        if stack_inputs.history is not None:
            seen = cache.get_seq_length()
            history = stack_inputs.history.bool()
            rows = history[:, :seen].any(-1) & history[:, seen]
        return StepNoise(self.config, stack_inputs.noise_generator, rows)

    def evaluate_stack(
        self,
        hidden_states: torch.Tensor,
        injection: torch.Tensor | None,
        stack_inputs: StackInputs,
        cache: ImplicitMamba2Cache | None,
        return_states: bool,
    ) -> tuple[torch.Tensor, tuple[Mamba2States | None, tuple | None, None]]:
        """One pass of the stack and `norm_f` against the committed states in `cache`, which it only reads; returns
        `(f(z), (states, hidden_states, None))` (see `StackRecorder`)."""
        mask = stack_inputs.padding_mask
        past = cache.states if cache is not None else None
        recorder = StackRecorder(stack_inputs, hidden_states)
        noise = self._step_noise(stack_inputs, cache, hidden_states.shape[1])
        conv_states, ssm_states = [], []
        for index, layer in enumerate(self.layers):
            hidden_states, states = layer(
                hidden_states,
                injection,
                mask,
                None if past is None else past[0][:, index],
                None if past is None else past[1][:, index],
                noise,
                return_states,
            )
            if return_states:
                conv_state, ssm_state = states
                if noise is not None:
                    # Each evaluation's candidate states get a draw; only the committed evaluation's reach the cache,
                    # so the committed states carry one draw per token, as the fork's noise after each cache write.
                    conv_state, ssm_state = noise.state(conv_state), noise.state(ssm_state)
                conv_states.append(conv_state)
                ssm_states.append(ssm_state)
            recorder.block(hidden_states)
        hidden_states = self.norm_f(hidden_states)
        states = (tuple(conv_states), tuple(ssm_states)) if return_states else None
        return hidden_states, (states, *recorder.finish(hidden_states))


class ImplicitMamba2ForCausalLM(ImplicitCausalLMMixin, ImplicitMamba2PreTrainedModel, GenerationMixin):
    """Implicit Mamba2 language model: `ImplicitMamba2Model` and a head tied to its embeddings. Full-sequence
    forwards are solved in simultaneous mode (or sequential, per `config.inference_mode`); `generate()` prefills per
    `config.prefill_mode` and decodes token by token, iterating each token to its fixed point against the committed
    `ImplicitMamba2Cache` before committing it once. `forward` passes `noise_generator` (the noise study's random
    generator, see `ImplicitMamba2Model.forward`) on to the backbone."""

    backbone_class = ImplicitMamba2Model
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, *args: Any, noise_generator: torch.Generator | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        # Named here so that generate() accepts it (it checks model kwargs against this signature), and handed to
        # every step: one generator draws the noise of the whole generation.
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if noise_generator is not None:
            model_inputs["noise_generator"] = noise_generator
        return model_inputs


__all__ = [
    "ImplicitMamba2Cache",
    "ImplicitMamba2ForCausalLM",
    "ImplicitMamba2Model",
    "ImplicitMamba2PreTrainedModel",
]
