"""Model presets (`llm/configs/<name>.json`, Hugging Face config.json style) and the model factory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from .configuration_parameternet_llama import ParameterNetLlamaConfig
from .modeling_parameternet_llama import ParameterNetLlamaForCausalLM

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_CLASSES: dict[str, type[LlamaConfig]] = {
    "llama": LlamaConfig,
    "parameternet_llama": ParameterNetLlamaConfig,
}


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


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
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"model config {path}: not valid JSON ({err})") from err


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> LlamaConfig:
    """A config.json-style dict (with model_type) -> LlamaConfig or ParameterNetLlamaConfig."""
    model_type = data.get("model_type", "llama")
    if model_type not in CONFIG_CLASSES:
        raise ValueError(f"{source}: model_type={model_type!r} is not one of {sorted(CONFIG_CLASSES)}")
    fields = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version", "auto_map")}
    try:
        return CONFIG_CLASSES[model_type](**fields)
    except TypeError as err:
        raise ValueError(f"{source}: {err}") from err


def load_model_config(name_or_path: str | Path, **overrides: Any) -> LlamaConfig:
    """A preset name (`llama-tiny`), a config.json path or an HF model directory -> LlamaConfig or
    ParameterNetLlamaConfig. `overrides` replace fields, e.g. `moe_projections=["up_proj"]`, `num_experts=4`."""
    data, source = _read_config_dict(name_or_path)
    data.update(overrides)
    return config_from_dict(data, source)


def build_model(config: LlamaConfig, *, attn_implementation: str | None = None,
                dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Vanilla LLaMA is transformers' LlamaForCausalLM, unchanged; ParameterNet-LLaMA is ours."""
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model_class = ParameterNetLlamaForCausalLM if isinstance(config, ParameterNetLlamaConfig) else LlamaForCausalLM
    model = model_class(config)
    if dtype is not None:
        model = model.to(dtype)
    return model
