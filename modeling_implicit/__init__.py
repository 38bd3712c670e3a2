"""Implicit language models (implicit Mamba2, implicit Llama) for transformers.

Importing this package registers the models with the Auto classes and marks them for remote code, so
`save_pretrained` writes the modeling files and `auto_map` next to the weights and the saved folder loads anywhere
with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_implicit import ImplicitPretrainedConfig
from .configuration_implicit_mamba2 import ImplicitMamba2Config
from .modeling_implicit_mamba2 import (
    ImplicitMamba2Cache,
    ImplicitMamba2ForCausalLM,
    ImplicitMamba2Model,
    ImplicitMamba2PreTrainedModel,
)
from .modeling_implicit_utils import (
    ConvergenceWarning,
    ImplicitCache,
    ImplicitCausalLMOutput,
    ImplicitModelOutput,
)
from .solver import SolverDivergenceError, SolverSettings, SolverStats, solve_fixed_point

AutoConfig.register(ImplicitMamba2Config.model_type, ImplicitMamba2Config, exist_ok=True)
AutoModel.register(ImplicitMamba2Config, ImplicitMamba2Model, exist_ok=True)
AutoModelForCausalLM.register(ImplicitMamba2Config, ImplicitMamba2ForCausalLM, exist_ok=True)
ImplicitMamba2Config.register_for_auto_class()
ImplicitMamba2Model.register_for_auto_class("AutoModel")
ImplicitMamba2ForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "ConvergenceWarning",
    "ImplicitCache",
    "ImplicitCausalLMOutput",
    "ImplicitMamba2Cache",
    "ImplicitMamba2Config",
    "ImplicitMamba2ForCausalLM",
    "ImplicitMamba2Model",
    "ImplicitMamba2PreTrainedModel",
    "ImplicitModelOutput",
    "ImplicitPretrainedConfig",
    "SolverDivergenceError",
    "SolverSettings",
    "SolverStats",
    "solve_fixed_point",
]
