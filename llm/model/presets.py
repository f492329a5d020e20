"""Model presets (`llm/configs/<name>.json`, Hugging Face config.json style) and the model factory.

A preset may name another as its `"base"` and give only what differs: a ParameterNet preset is its vanilla preset plus
the MoE fields (and its model_type), `llama-small` is `llama-tiny` under the name the CPU experiment uses. The resolved
dict (base first, the preset's own keys over it, no `"base"`) is what the model and its exported config.json get."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, PretrainedConfig, PreTrainedModel

from .configuration_parameternet_llama import LEGACY_EXPERT_BIAS, ROUTING_RECIPES, ParameterNetLlamaConfig
from .modeling_parameternet_llama import ParameterNetLlamaForCausalLM
from .peers import PEER_MODELS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "parameternet_llama": ParameterNetLlamaConfig,
    "mixtral": MixtralConfig,  # a peer implementation of a standard MoE (llm/model/peers.py)
}


# Keys LlamaConfig still takes and folds into rope_parameters (older config.json files carry them).
LEGACY_KEYS = ("rope_theta", "rope_scaling")
# Fields every transformers config has (bookkeeping, output flags, classification heads): none of them is a setting
# of a causal LM to pretrain, so an override naming one is a mistake.
NOT_OVERRIDABLE = tuple(f.name for f in dataclasses.fields(PretrainedConfig)) + ("model_type", "auto_map")
# An override that is not a field: {"routing_recipe": NAME} sets the fields of ROUTING_RECIPES[NAME] (other overrides
# given with it win), so a run can ask for the paper's routing by name and its config.json records the fields.
ROUTING_RECIPE = "routing_recipe"
PARAMETERNET_KEYS = tuple(
    f.name for f in dataclasses.fields(ParameterNetLlamaConfig) if f.name not in LlamaConfig.__dataclass_fields__
) + (ROUTING_RECIPE,)
# Dimensions every LLaMA needs >= 1 (a 0 or a negative one fails deep inside the model, or divides by zero).
POSITIVE_DIMENSIONS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


BASE = "base"


def _read_config_dict(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(
            f"model={str(name_or_path)!r} is neither a preset ({', '.join(list_presets())}) "
            f"nor a config.json file or directory"
        )
    return _resolve_base(_read_json(path), str(path), chain=(path.resolve(),)), str(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"model config {path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"model config {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _resolve_base(data: dict[str, Any], source: str, chain: tuple[Path, ...]) -> dict[str, Any]:
    """`data` with its `"base"` preset (resolved the same way, in turn) under it: the base's keys, then data's."""
    if BASE not in data:
        return data
    name = data[BASE]
    path = (CONFIG_DIR / f"{name}.json").resolve() if isinstance(name, str) else None
    if path is None or not path.is_file():
        raise ValueError(f"model config {source}: base={name!r} is not a preset ({', '.join(list_presets())})")
    if path in chain:
        cycle = " -> ".join(p.stem for p in (*chain, path))
        raise ValueError(f"model config {source}: base={name!r} makes a cycle ({cycle}); a base must not lead back")
    base = _resolve_base(_read_json(path), str(path), (*chain, path))
    return {**base, **{k: v for k, v in data.items() if k != BASE}}


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> LlamaConfig:
    """A config.json-style dict (with model_type) -> LlamaConfig or ParameterNetLlamaConfig."""
    model_type = data.get("model_type", "llama")
    if model_type not in CONFIG_CLASSES:
        raise ValueError(f"{source}: model_type={model_type!r} is not one of {sorted(CONFIG_CLASSES)}")
    fields = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version", "auto_map")}
    try:
        return CONFIG_CLASSES[model_type](**fields)
    except (TypeError, ValueError, ZeroDivisionError, StrictDataclassError) as err:
        # transformers' strict-dataclass errors span several lines; the CLIs print one.
        raise ValueError(f"{source}: {' '.join(str(err).split())}") from err


def overridable_keys(config_class: type[LlamaConfig]) -> list[str]:
    keys = [f.name for f in dataclasses.fields(config_class) if f.name not in NOT_OVERRIDABLE]
    recipe = [ROUTING_RECIPE] if issubclass(config_class, ParameterNetLlamaConfig) else []
    return keys + list(LEGACY_KEYS) + recipe


def check_overrides(model: str, model_type: str, overrides: dict[str, Any]) -> None:
    """Refuse override keys the model would silently keep as stray attributes (and save into its config.json):
    typos, bookkeeping keys, and ParameterNet-only keys given to a vanilla LLaMA."""
    config_class = CONFIG_CLASSES[model_type]
    valid = overridable_keys(config_class)
    for key, value in overrides.items():
        if key in valid:
            continue
        if key == LEGACY_EXPERT_BIAS and issubclass(config_class, ParameterNetLlamaConfig):
            continue  # the old name of expert_output_bias: the config reads it, with a warning
        if key == "model_type":
            raise ValueError(
                f"model_overrides: model_type={value!r} cannot be overridden; choose the model with "
                f"--model (presets: {', '.join(list_presets())})"
            )
        if key in PARAMETERNET_KEYS:
            raise ValueError(
                f"model_overrides: {key!r} applies only to ParameterNet models, but model={model!r} is a vanilla LLaMA "
                f"(model_type {model_type!r}); use a parameternet-llama-* model or drop {key!r}"
            )
        elsewhere = [k for k in PARAMETERNET_KEYS if k not in valid]  # named as such, for a typo on a vanilla model
        close = difflib.get_close_matches(str(key), valid + elsewhere, n=3)
        named = [repr(k) + (" (ParameterNet models only)" if k in elsewhere else "") for k in close]
        hint = f"did you mean {' or '.join(named)}? " if close else ""
        raise ValueError(
            f"model_overrides: unknown key {key!r} for model={model!r} ({config_class.__name__}); {hint}"
            f"valid keys: {', '.join(sorted(valid))}"
        )


def _check_dimensions(data: dict[str, Any], source: str) -> None:
    """Ranges LlamaConfig does not check itself, on the merged dict (before construction, which may divide by them)."""
    for key in POSITIVE_DIMENSIONS:
        value = data.get(key)
        if key in data and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{source}: {key}={value!r} must be an integer >= 1")
    kv_heads = data.get("num_key_value_heads")
    heads, hidden = data.get("num_attention_heads"), data.get("hidden_size")
    if isinstance(heads, int) and isinstance(hidden, int) and hidden % heads:
        raise ValueError(
            f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}; choose "
            f"a hidden_size that is (e.g. {hidden - hidden % heads or heads})"
        )
    if kv_heads is not None and isinstance(heads, int):
        if not isinstance(kv_heads, int) or isinstance(kv_heads, bool) or kv_heads < 1 or heads % kv_heads:
            raise ValueError(
                f"{source}: num_key_value_heads={kv_heads!r} must be an integer dividing "
                f"num_attention_heads={heads} (equal to it for multi-head attention)"
            )
    for key in ("rms_norm_eps", "rope_theta"):
        value = data.get(key)
        if key in data and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        ):
            raise ValueError(f"{source}: {key}={value!r} must be a finite number > 0")


def expand_routing_recipe(overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides with {"routing_recipe": NAME} replaced by the recipe's fields (explicit fields given too win)."""
    if ROUTING_RECIPE not in overrides:
        return overrides
    name = overrides[ROUTING_RECIPE]
    if name not in ROUTING_RECIPES:
        raise ValueError(
            f"model_overrides: routing_recipe={name!r} is not one of {sorted(ROUTING_RECIPES)}; "
            f'e.g. {{"routing_recipe": "paper"}} for the paper\'s routing'
        )
    rest = {k: v for k, v in overrides.items() if k != ROUTING_RECIPE}
    return {**ROUTING_RECIPES[name], **rest}


def load_model_config(name_or_path: str | Path, **overrides: Any) -> LlamaConfig:
    """A preset name (`llama-tiny`), a config.json path or an HF model directory -> LlamaConfig or
    ParameterNetLlamaConfig. `overrides` replace fields, e.g. `moe_projections=["up_proj"]`, `num_experts=4`, or
    name a routing recipe (`routing_recipe="paper"`); keys the model does not have are refused (they would otherwise
    be kept and saved, unused)."""
    data, source = _read_config_dict(name_or_path)
    model_type = data.get("model_type", "llama")
    if model_type in CONFIG_CLASSES:
        check_overrides(str(name_or_path), model_type, overrides)
    overrides = expand_routing_recipe(overrides)
    data.update(overrides)
    source = f"model={str(name_or_path)!r}"
    if overrides:
        source += f" with model_overrides {json.dumps(overrides, default=str)}"
    _check_dimensions(data, source)
    return config_from_dict(data, source)


def build_model(
    config: LlamaConfig, *, attn_implementation: str | None = None, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """Vanilla LLaMA is transformers' LlamaForCausalLM, unchanged; ParameterNet-LLaMA is ours; a peer MoE is
    transformers' own (llm/model/peers.py)."""
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    if isinstance(config, ParameterNetLlamaConfig):
        model_class: type[PreTrainedModel] = ParameterNetLlamaForCausalLM
    else:
        model_class = PEER_MODELS.get(type(config), LlamaForCausalLM)
    model = model_class(config)
    if dtype is not None:
        model = model.to(dtype)
    return model
