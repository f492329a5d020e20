"""LLaMA and ParameterNet-LLaMA models, presets and accounting.

Importing this package registers ParameterNet-LLaMA with transformers' Auto classes, and marks it so that
`save_pretrained` writes `auto_map` and the self-contained code files next to the weights.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_parameternet_llama import MOE_PROJECTIONS, ParameterNetLlamaConfig
from .modeling_parameternet_llama import ParameterNetCausalLMOutput, ParameterNetLlamaForCausalLM
from .moe import MoELinear, RoutingStats
from .presets import build_model, list_presets, load_model_config
from .router import RouterConfig

AutoConfig.register(ParameterNetLlamaConfig.model_type, ParameterNetLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM, exist_ok=True)
ParameterNetLlamaConfig.register_for_auto_class()
ParameterNetLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "MOE_PROJECTIONS",
    "MoELinear",
    "ParameterNetCausalLMOutput",
    "ParameterNetLlamaConfig",
    "ParameterNetLlamaForCausalLM",
    "RouterConfig",
    "RoutingStats",
    "build_model",
    "list_presets",
    "load_model_config",
]
