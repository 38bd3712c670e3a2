"""Implicit language models (implicit Mamba2, implicit Llama) for transformers.

Importing this package registers the models with the Auto classes and marks them for remote code, so
`save_pretrained` writes the modeling files and `auto_map` next to the weights and the saved folder loads anywhere
with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_implicit import ImplicitPreTrainedConfig, ImplicitPretrainedConfig, UnknownConfigKeyWarning
from .configuration_implicit_llama import ImplicitLlamaConfig
from .configuration_implicit_mamba2 import ImplicitMamba2Config
from .modeling_implicit_llama import (
    ImplicitLlamaCache,
    ImplicitLlamaForCausalLM,
    ImplicitLlamaModel,
    ImplicitLlamaPreTrainedModel,
    LengthExtrapolationWarning,
)
from .modeling_implicit_mamba2 import (
    ImplicitMamba2Cache,
    ImplicitMamba2ForCausalLM,
    ImplicitMamba2Model,
    ImplicitMamba2PreTrainedModel,
)
from .modeling_implicit_utils import (
    CacheSnapshot,
    ConvergenceWarning,
    ImplicitCache,
    ImplicitCausalLMOutput,
    ImplicitModelOutput,
    StackInputs,
)
from .solver import SolverSettings, solve_fixed_point
from .solver_ops import SolverDivergenceError, SolverStats

# The `model_type` of every implicit family (what tools use to tell our models from other transformers models), and the
# family's short name (the paper's and the presets': "mamba2", "llama").
IMPLICIT_FAMILIES = {ImplicitMamba2Config.model_type: "mamba2", ImplicitLlamaConfig.model_type: "llama"}
IMPLICIT_MODEL_TYPES = tuple(IMPLICIT_FAMILIES)

for _config, _model, _causal_lm in (
    (ImplicitMamba2Config, ImplicitMamba2Model, ImplicitMamba2ForCausalLM),
    (ImplicitLlamaConfig, ImplicitLlamaModel, ImplicitLlamaForCausalLM),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _causal_lm, exist_ok=True)
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")
    _causal_lm.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "IMPLICIT_FAMILIES",
    "IMPLICIT_MODEL_TYPES",
    "CacheSnapshot",
    "ConvergenceWarning",
    "ImplicitCache",
    "ImplicitCausalLMOutput",
    "ImplicitLlamaCache",
    "ImplicitLlamaConfig",
    "ImplicitLlamaForCausalLM",
    "ImplicitLlamaModel",
    "ImplicitLlamaPreTrainedModel",
    "ImplicitMamba2Cache",
    "ImplicitMamba2Config",
    "ImplicitMamba2ForCausalLM",
    "ImplicitMamba2Model",
    "ImplicitMamba2PreTrainedModel",
    "ImplicitModelOutput",
    "ImplicitPreTrainedConfig",
    "ImplicitPretrainedConfig",
    "LengthExtrapolationWarning",
    "SolverDivergenceError",
    "SolverSettings",
    "SolverStats",
    "StackInputs",
    "UnknownConfigKeyWarning",
    "solve_fixed_point",
]
