"""The training configuration: one dataclass, YAML presets that mirror it field for field, `--key value` overrides.

Every number the run depends on lives here (batch sizes, LR schedule, precision, ZeRO stage...); the DeepSpeed JSON is
completed from it. Unknown keys and values of the wrong type are refused with the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class TrainConfig:
    # model
    model: str = "llama-tiny"  # preset name in llm/configs/, a config.json, or an HF model directory
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"moe_projections": ["up_proj"]}
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 | eager
    activation_checkpointing: bool = False
    compile: bool = False
    # data
    data_path: list[str] = field(default_factory=list)  # Megatron style: [PREFIX] or [W1, PREFIX1, W2, PREFIX2]; [] = embedded corpus
    tokenizer: str | None = None  # HF tokenizer directory; None with the embedded corpus = its tokenizer
    split: str | None = None  # train,valid,test by documents, e.g. "969,30,1"; None = the corpus default
    data_cache_dir: str | None = None  # where index arrays are cached (default: next to the shards)
    seq_len: int = 256
    micro_batch_size: int = 8
    global_batch_size: int = 16
    train_iters: int | None = None
    train_tokens: int | None = None  # a token budget instead of train_iters
    # optimizer and schedule
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 10
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    lr_decay_iters: int | None = None  # default: train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # engine
    precision: str = "fp32"  # fp32 | bf16 | fp16
    zero_stage: int = 1
    ds_config: str | None = None  # ds_configs/<name>.json or a path; None = ds_configs/zero<zero_stage>.json
    expert_parallel_size: int = 1
    # evaluation, checkpoints, logging
    eval_interval: int = 50
    eval_iters: int = 4
    save_interval: int = 100
    keep_last: int = 2
    log_interval: int = 10
    seed: int = 1234
    output_dir: str = "runs/default"
    resume: str = "none"  # none | auto | <checkpoint directory>
    max_nonfinite_steps: int = 5
    export: bool = True  # export a Hugging Face directory (with tokenizer) to <output_dir>/hf at the end
    progress_bar: bool = True

    def resolved_train_iters(self) -> int:
        if self.train_iters is not None:
            return self.train_iters
        assert self.train_tokens is not None
        return math.ceil(self.train_tokens / (self.global_batch_size * self.seq_len))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
CHOICES = {
    "attn_implementation": ("sdpa", "flash_attention_2", "eager"),
    "lr_decay_style": ("cosine", "linear", "constant"),
    "precision": ("fp32", "bf16", "fp16"),
    "zero_stage": (0, 1, 2, 3),
}


def _type_of(name: str) -> Any:
    return typing.get_type_hints(TrainConfig)[name]


def _coerce(name: str, value: Any, from_cli: bool) -> Any:
    """Check (and, for CLI strings, parse) `value` against the field's type."""
    hint = _type_of(name)
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
    origin = typing.get_origin(base) or base
    expected = getattr(base, "__name__", str(base))

    if from_cli and isinstance(value, str):
        if optional and value.lower() in ("none", "null"):
            return None
        if origin is bool:
            lowered = value.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
        elif origin is int:
            try:
                return int(float(value)) if "e" in value.lower() and float(value).is_integer() else int(value)
            except ValueError:
                pass
        elif origin is float:
            try:
                return float(value)
            except ValueError:
                pass
        elif origin is list:
            text = value.strip()
            return json.loads(text) if text.startswith("[") else text.split()
        elif origin is dict:
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                pass
        elif origin is str:
            return value
        raise ValueError(f"--{name} {value!r}: expected {expected}{' or none' if optional else ''}")

    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}=None: this field needs a {expected} value")
    if origin is list and isinstance(value, str):  # YAML `data_path: "0.7 a 0.3 b"`, as on the command line
        return value.split()
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is bool and not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected true or false")
    if origin is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name}={value!r}: expected an integer")
    if not isinstance(value, origin):
        raise ValueError(f"{name}={value!r}: expected {expected}, got {type(value).__name__}")
    if origin is list:
        return [str(v) for v in value]
    return value


def _apply(config: TrainConfig, updates: dict[str, Any], source: str, from_cli: bool) -> None:
    # The budget is train_iters OR train_tokens: a layer that gives one replaces the other given by a layer below
    # (`--train_tokens 2e9` over a preset with train_iters); one layer giving both is still refused by validate().
    names = {key.replace("-", "_") for key in updates}
    for given, other in (("train_iters", "train_tokens"), ("train_tokens", "train_iters")):
        if given in names and other not in names:
            setattr(config, other, None)
    for key, value in updates.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            close = [f for f in FIELDS if name.split("_")[0] in f]
            hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
            raise ValueError(f"{source}: unknown config key {key!r}{hint}; known keys: {', '.join(FIELDS)}")
        setattr(config, name, _coerce(name, value, from_cli))


def validate(config: TrainConfig) -> None:
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name}={getattr(config, name)!r} is not one of {allowed}")
    if config.train_iters is None and config.train_tokens is None:
        raise ValueError("set train_iters or train_tokens (a token budget); neither is set")
    if config.train_iters is not None and config.train_tokens is not None:
        raise ValueError(
            f"train_iters={config.train_iters} and train_tokens={config.train_tokens} are both set; keep one"
        )
    positive = ("seq_len", "micro_batch_size", "global_batch_size", "eval_interval", "save_interval", "log_interval",
                "keep_last", "max_nonfinite_steps", "expert_parallel_size")
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"{name}={getattr(config, name)} must be >= 1")
    if config.expert_parallel_size > 1 and config.zero_stage == 3:
        raise ValueError(
            f"expert_parallel_size={config.expert_parallel_size} with zero_stage=3 is not supported (DeepSpeed "
            f"refuses MoE under ZeRO-3); use zero_stage 1 or 2 with expert parallelism, or expert_parallel_size 1 "
            f"with ZeRO-3 (which then shards the experts like any other weight)"
        )
    if config.resolved_train_iters() < 1:
        raise ValueError("train_iters (or train_tokens / (global_batch_size x seq_len)) must be >= 1")
    for name in ("eval_iters", "warmup_iters"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name}={getattr(config, name)} must be >= 0")
    if not 0 <= config.min_lr <= config.lr:
        raise ValueError(f"min_lr={config.min_lr} must lie in [0, lr={config.lr}]")
    if config.resume not in ("none", "auto") and not Path(config.resume).exists():
        raise ValueError(f"resume={config.resume!r}: not 'none', 'auto' or an existing checkpoint directory")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                cli_overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file (a preset name in llm/configs/ or a path) <- `overrides` <- `--key value` pairs."""
    config = TrainConfig()
    if path is not None:
        file = Path(path)
        if not file.is_file():
            file = CONFIG_DIR / f"{path}.yaml"
        if not file.is_file():
            presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise ValueError(f"config={str(path)!r}: no such file, nor a preset ({', '.join(presets)})")
        data = yaml.safe_load(file.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a mapping of config keys, got {type(data).__name__}")
        _apply(config, data, str(file), from_cli=False)
    _apply(config, overrides or {}, "overrides", from_cli=False)
    _apply(config, parse_cli_pairs(cli_overrides or []), "command line", from_cli=True)
    validate(config)
    return config


def _is_list_field(key: str) -> bool:
    name = key.replace("-", "_")
    return name in FIELDS and typing.get_origin(_type_of(name)) is list


def parse_cli_pairs(argv: list[str]) -> dict[str, str]:
    """['--lr', '3e-4', '--export=false'] -> {'lr': '3e-4', 'export': 'false'}.

    A list field takes every word up to the next --flag, as Megatron's `--data-path W1 P1 W2 P2` does:
    ['--data_path', '0.7', 'a', '0.3', 'b'] -> {'data_path': '0.7 a 0.3 b'} (the quoted one-word form works too)."""
    pairs: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; overrides are --key value pairs")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError(f"--{key} needs a value")
            end = i + 2
            if _is_list_field(key):
                while end < len(argv) and not argv[end].startswith("--"):
                    end += 1
            value = " ".join(argv[i + 1:end])
            i = end
        pairs[key] = value
    return pairs


def dump_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
