"""Configuration of the implicit Llama language model."""

from __future__ import annotations

from typing import Any

from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_implicit import ImplicitPreTrainedConfig, _positive_int, _require, _require_number


class ImplicitLlamaConfig(ImplicitPreTrainedConfig):
    r"""
    Configuration of [`ImplicitLlamaForCausalLM`]: a stack of Llama-3-style pre-norm blocks (RMSNorm, rotary
    grouped-query attention, SwiGLU MLP) iterated to a fixed point, with the input injected into every block's
    query/key/value projections (`Attn(z W_qkv + x W_inp)`, before the rotary embedding).

    Inherits the solver and common fields of [`ImplicitPreTrainedConfig`] (documented there, once);
    `rms_norm_eps` is an alias of its `layer_norm_epsilon`. Llama fields (names as in transformers' `LlamaConfig`):
        intermediate_size (`int`, defaults to 2048): width of the SwiGLU MLP.
        num_attention_heads (`int`, defaults to 12): query heads; must divide `hidden_size`.
        num_key_value_heads (`int`, *optional*): key/value heads (grouped-query attention); must divide
            `num_attention_heads`. Defaults to `num_attention_heads` (multi-head attention).
        head_dim (`int`, *optional*): channels per head. Defaults to `hidden_size // num_attention_heads`.
        hidden_act (`str`, defaults to `"silu"`): activation of the MLP gate.
        max_position_embeddings (`int`, defaults to 2048): the context length the model is trained for. Longer
            inputs still run: rotary embeddings are computed for any position, so positions beyond it are length
            extrapolation (a warning says so once).
        rope_parameters (`dict`, *optional*): rotary embedding parameters as in transformers
            (`{"rope_type": "default", "rope_theta": 500000.0}` by default; other `rope_type`s such as `"linear"`,
            `"dynamic"`, `"yarn"` and `"llama3"` take their usual keys). The legacy `rope_theta=` and `rope_scaling=`
            keyword arguments are folded into it, as for `LlamaConfig`.
        attention_bias (`bool`, defaults to `False`): bias in the query/key/value/output projections.
        attention_dropout (`float`, defaults to 0.0): dropout on attention weights while training.
        mlp_bias (`bool`, defaults to `False`): bias in the MLP projections.

    The input injection (RMSNorm, then a Linear with bias from `hidden_size` to the query/key/value width
    `(num_attention_heads + 2 * num_key_value_heads) * head_dim`, split in that order) exists only when
    `implicit=True`. Attention runs through transformers' attention interface: pass `attn_implementation="sdpa"`
    (default), `"eager"` or `"flash_attention_2"` to `from_pretrained` / `from_config`.
    """

    model_type = "implicit_llama"
    attribute_map = {**ImplicitPreTrainedConfig.attribute_map, "rms_norm_eps": "layer_norm_epsilon"}
    default_theta = 500000.0  # Llama 3, and the reference implicit Llama

    vocab_size: int = 50277
    hidden_size: int = 768
    num_hidden_layers: int = 12
    intermediate_size: int = 2048
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        # transformers folds the legacy rotary keys into `rope_parameters` before our validation runs: check its type
        # first, so that a wrong one is named instead of failing inside transformers.
        self._validate_rope_parameters_type()
        # Derived defaults first: the base validates the finished config.
        heads = self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = heads
        if self.head_dim is None and _positive_int(heads) and _positive_int(self.hidden_size):
            self.head_dim = self.hidden_size // heads
        super().__post_init__(**kwargs)

    def _validate_rope_parameters_type(self) -> None:
        _require(
            self.rope_parameters is None or isinstance(self.rope_parameters, dict),
            "rope_parameters", self.rope_parameters, "None or a dict of rotary parameters",
        )

    @property
    def qkv_size(self) -> int:
        """Width of the concatenated query/key/value projections, which the input injection matches."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    def validate_fields(self) -> None:
        super().validate_fields()
        for name in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
            _require(_positive_int(getattr(self, name)), name, getattr(self, name), "a positive integer")
        _require(
            _positive_int(self.max_position_embeddings),
            "max_position_embeddings",
            self.max_position_embeddings,
            "a positive integer",
        )
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            self.num_attention_heads,
            f"a divisor of hidden_size ({self.hidden_size})",
        )
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            self.num_key_value_heads,
            f"a divisor of num_attention_heads ({self.num_attention_heads})",
        )
        _require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "even (rotary embeddings rotate pairs)")
        _require(
            isinstance(self.hidden_act, str) and self.hidden_act in ACT2FN,
            "hidden_act", self.hidden_act, "an activation name known to transformers",
        )
        _require_number("attention_dropout", self.attention_dropout, lambda v: 0 <= v < 1, "in [0, 1)")
        for name in ("attention_bias", "mlp_bias"):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        self._validate_rope_parameters_type()
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        _require(
            rope_type == "default" or rope_type in ROPE_INIT_FUNCTIONS,
            "rope_parameters['rope_type']",
            rope_type,
            f"'default' or one of {sorted(ROPE_INIT_FUNCTIONS)}",
        )
