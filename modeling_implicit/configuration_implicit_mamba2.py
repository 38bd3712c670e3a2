"""Configuration of the implicit Mamba2 language model."""

from __future__ import annotations

import math

from .configuration_implicit import (
    ImplicitPreTrainedConfig,
    _is_number,
    _positive_int,
    _require,
    _require_number,
    _require_pair,
)

NOISE_MODES = ("additive", "multiplicative")


class ImplicitMamba2Config(ImplicitPreTrainedConfig):
    r"""
    Configuration of [`ImplicitMamba2ForCausalLM`]: a stack of pre-norm residual Mamba2 blocks iterated to a fixed
    point, with the input injected into every block's input projection.

    Inherits the solver and common fields of [`ImplicitPreTrainedConfig`] (documented there, once). Mamba2 fields
    (names as in transformers' `Mamba2Config`):
        state_size (`int`, defaults to 128): SSM state size `N` per head.
        head_dim (`int`, defaults to 64): channels per SSM head `P`; must divide `expand * hidden_size`.
        expand (`int`, defaults to 2): inner width of the mixer is `expand * hidden_size`.
        n_groups (`int`, defaults to 1): groups sharing `B` and `C`; must divide the number of heads.
        conv_kernel (`int`, defaults to 4): width of the causal depthwise convolution.
        chunk_size (`int`, defaults to 256): chunk length of the parallel (SSD) scan, in tokens.
        use_bias (`bool`, defaults to `False`): bias in the mixers' `in_proj` and `out_proj`.
        use_conv_bias (`bool`, defaults to `True`): bias in the convolution.
        time_step_min / time_step_max (`float`, defaults to 0.001 / 0.1): range of the initial time step `dt`.
        time_step_floor (`float`, defaults to 1e-4): lower clamp of the initial `dt`.
        time_step_limit (`tuple[float, float]`, defaults to `(0.0, inf)`): clamp of `dt` in every forward.
        A_init_range (`tuple[float, float]`, defaults to `(1.0, 16.0)`): range of the initial decay rates `-A`.
        rescale_prenorm_residual (`bool`, defaults to `True`): divide the initial `out_proj` weights by
            `sqrt(num_hidden_layers)` (GPT-2 scheme, as mamba does).

    Analog-noise study (the markschoene/implicit_languagemodels fork; off by default). Gaussian noise on the
    single-token step path only, i.e. every sequential token after the first (a step against committed states):
        latent_noise_db (`float`, defaults to 0.0): signal-to-noise ratio in dB of the noise added to every mixer's
            input (after the block's pre-norm) at every evaluation of `f`, so at every solver iteration. 0 or less:
            no noise (the fork's meaning of 0).
        state_noise_db (`float`, defaults to 0.0): SNR in dB of the noise added to each layer's committed
            convolution and SSM states once per token.
        noise_mode (`str`, defaults to `"additive"`): `"additive"`: `x + sigma * eps` with
            `sigma = RMS(x) * 10 ** (-dB / 20)`, the RMS over the whole tensor (batch included); `"multiplicative"`:
            `x * (1 + sigma * eps)` with `sigma = 10 ** (-dB / 20)`.
        The noise is drawn from the `noise_generator` passed to `forward` / `generate` (torch's default generator
        when none is), so a run can be repeated.

    The input injection (RMSNorm, then a Linear with bias from `hidden_size` to the in-projection width
    `2 * expand * hidden_size + 2 * n_groups * state_size + num_heads`) exists only when `implicit=True`.
    """

    model_type = "implicit_mamba2"

    state_size: int = 128
    head_dim: int = 64
    expand: int = 2
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 256
    use_bias: bool = False
    use_conv_bias: bool = True
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: list[float] | tuple[float, ...] = (0.0, float("inf"))
    A_init_range: list[float] | tuple[float, ...] = (1.0, 16.0)
    rescale_prenorm_residual: bool = True
    latent_noise_db: float = 0.0
    state_noise_db: float = 0.0
    noise_mode: str = "additive"

    @property
    def noise_active(self) -> bool:
        return self.latent_noise_db > 0 or self.state_noise_db > 0

    @property
    def stochastic_stack(self) -> bool:
        return self.noise_active

    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    @property
    def num_heads(self) -> int:
        return self.intermediate_size // self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: x, B and C."""
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    @property
    def in_proj_size(self) -> int:
        """Width of the in-projection (gate, x, B, C, dt), which the input injection matches."""
        return self.intermediate_size + self.conv_dim + self.num_heads

    def validate_fields(self) -> None:
        super().validate_fields()
        for name in ("state_size", "head_dim", "expand", "n_groups", "conv_kernel", "chunk_size"):
            _require(_positive_int(getattr(self, name)), name, getattr(self, name), "a positive integer")
        _require(
            self.intermediate_size % self.head_dim == 0,
            "head_dim",
            self.head_dim,
            f"a divisor of expand * hidden_size = {self.intermediate_size}",
        )
        _require(
            self.num_heads % self.n_groups == 0,
            "n_groups",
            self.n_groups,
            f"a divisor of the number of heads ({self.num_heads})",
        )
        for name in ("use_bias", "use_conv_bias", "rescale_prenorm_residual"):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        _require_number("time_step_max", self.time_step_max, lambda v: math.isfinite(v) and v > 0, "finite and > 0")
        _require_number(
            "time_step_min", self.time_step_min, lambda v: 0 < v <= self.time_step_max, "in (0, time_step_max]"
        )
        _require_number("time_step_floor", self.time_step_floor, lambda v: math.isfinite(v) and v >= 0,
                        "finite and >= 0")
        _require_pair("time_step_limit", self.time_step_limit, lambda low, high: 0 <= low < high, "0 <= low < high")
        for name in ("latent_noise_db", "state_noise_db"):
            value = getattr(self, name)
            _require(
                _is_number(value) and math.isfinite(value),
                name, value, "a finite number of dB (0 or less: no noise)",
            )
        _require(self.noise_mode in NOISE_MODES, "noise_mode", self.noise_mode, f"one of {NOISE_MODES}")
        _require_pair(
            "A_init_range", self.A_init_range, lambda low, high: 0 < low <= high and math.isfinite(high),
            "0 < low <= high, finite",
        )
