"""The training configuration: one dataclass, YAML presets that mirror it field for field, `--key value` overrides.

Every number the run depends on lives here (batch sizes, LR schedule, precision, ZeRO stage...); the DeepSpeed JSON is
completed from it. Unknown keys and values of the wrong type are refused with the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import sys
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
    ds_config: str | None = None  # runtime/ds_configs/<name>.json or a path; None = runtime/ds_configs/zero<zero_stage>.json
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
# The smallest valid value of each integer field (None, where allowed, means "not set"), and what the edge means.
INT_MINIMUMS = {
    "seq_len": (1, ""),
    "micro_batch_size": (1, ""),
    "global_batch_size": (1, ""),
    "train_iters": (1, ""),
    "train_tokens": (1, ""),
    "warmup_iters": (0, " (0 = no warmup)"),
    "lr_decay_iters": (1, " (or none: decay over train_iters)"),
    "expert_parallel_size": (1, " (1 = no expert parallelism)"),
    "eval_interval": (1, ""),
    "eval_iters": (0, " (0 = no evaluation)"),
    "save_interval": (1, ""),
    "keep_last": (1, ""),
    "log_interval": (1, ""),
    "seed": (0, ""),
    "max_nonfinite_steps": (1, ""),
}
MAX_SEED = 2**32 - 1  # numpy's and most tools' seed range
# Each float field's valid range as (low, low inclusive, high, high inclusive) and the fix that goes with it.
FLOAT_RANGES = {
    "lr": (0.0, False, math.inf, False, "the peak learning rate, e.g. 3e-4"),
    "weight_decay": (0.0, True, math.inf, False, "0 turns it off; 0.1 is usual"),
    "adam_beta1": (0.0, True, 1.0, False, "e.g. 0.9"),
    "adam_beta2": (0.0, True, 1.0, False, "e.g. 0.95"),
    "adam_eps": (0.0, False, math.inf, False, "e.g. 1e-8"),
    "grad_clip": (0.0, True, math.inf, False, "the max global gradient norm; 0 turns clipping off"),
}


def _type_of(name: str) -> Any:
    return typing.get_type_hints(TrainConfig)[name]


def _example(name: str) -> str:
    default = getattr(TrainConfig(), name)
    examples = {"train_iters": "1000", "train_tokens": "2000000000", "lr_decay_iters": "1000",
                "model_overrides": "'{\"num_experts\": 4}'", "data_path": "shards/corpus_text_document"}
    if name in examples:
        return f"--{name} {examples[name]}"
    return f"--{name} {str(default).lower() if isinstance(default, bool) else default}"


def _coerce(name: str, value: Any, from_cli: bool) -> Any:
    """Check (and, for CLI strings, parse) `value` against the field's type."""
    hint = _type_of(name)
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
    origin = typing.get_origin(base) or base
    expected = {bool: "true or false", list: "a list", dict: "a JSON object"}.get(origin, origin.__name__)

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
            except (ValueError, OverflowError):
                pass
        elif origin is float:
            try:
                return float(value)
            except ValueError:
                pass
        elif origin is list:
            text = value.strip()
            if not text.startswith("["):
                return text.split()
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"--{name} {value!r}: not valid JSON ({err.msg} at column {err.colno}); write "
                                 f"the words separated by spaces, e.g. {_example(name)}") from None
            if isinstance(parsed, list):
                return [str(v) for v in parsed]
        elif origin is dict:
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"--{name} {value!r}: not valid JSON ({err.msg} at column {err.colno}); write a "
                                 f"JSON object with double-quoted keys, e.g. {_example(name)}") from None
            if isinstance(parsed, dict):
                return parsed
            raise ValueError(f"--{name} {value!r}: expected a JSON object, got a JSON {type(parsed).__name__}; "
                             f"e.g. {_example(name)}")
        elif origin is str:
            return value
        raise ValueError(f"--{name} {value!r}: expected {expected}{' or none' if optional else ''}, "
                         f"e.g. {_example(name)}")

    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}=None: this field needs {expected} value, e.g. {_example(name)}")
    if origin is list and isinstance(value, str):  # YAML `data_path: "0.7 a 0.3 b"`, as on the command line
        return value.split()
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is bool and not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected true or false")
    if origin is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name}={value!r}: expected an integer, e.g. {_example(name)}")
    if not isinstance(value, origin):
        raise ValueError(f"{name}={value!r}: expected {expected}, got {type(value).__name__}, e.g. {_example(name)}")
    if origin is list:
        return [str(v) for v in value]
    return value


def _apply(config: TrainConfig, updates: dict[str, Any], source: str, from_cli: bool) -> None:
    # The budget is train_iters OR train_tokens: a layer that gives one replaces the other given by a layer below
    # (`--train_tokens 2e9` over a preset with train_iters); one layer giving both is still refused by validate().
    names = {str(key).replace("-", "_") for key in updates}
    for given, other in (("train_iters", "train_tokens"), ("train_tokens", "train_iters")):
        if given in names and other not in names:
            setattr(config, other, None)
    for key, value in updates.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ValueError(f"{source}: unknown config key {key!r}{hint}; known keys: {', '.join(FIELDS)}")
        try:
            setattr(config, name, _coerce(name, value, from_cli))
        except ValueError as err:
            raise ValueError(str(err) if from_cli else f"{source}: {err}") from None


def _check_numbers(config: TrainConfig) -> None:
    for name, allowed in CHOICES.items():
        value = getattr(config, name)
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}; "
                             f"e.g. --{name} {getattr(TrainConfig(), name)}")
    for name, (minimum, meaning) in INT_MINIMUMS.items():
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ValueError(f"{name}={value} must be >= {minimum}{meaning}")
    if config.seed > MAX_SEED:
        raise ValueError(f"seed={config.seed} must be at most 2**32 - 1 = {MAX_SEED}")
    # lr first: a bad lr must be named as such, not as a min_lr outside [0, lr].
    for name, (low, low_ok, high, high_ok, fix) in FLOAT_RANGES.items():
        value = getattr(config, name)
        inside = (value >= low if low_ok else value > low) and (value <= high if high_ok else value < high)
        if not inside:
            bounds = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
            raise ValueError(f"{name}={value} must be a finite number in {bounds}; {fix}")
    if not (math.isfinite(config.min_lr) and 0 <= config.min_lr <= config.lr):
        raise ValueError(f"min_lr={config.min_lr} must lie in [0, lr={config.lr}]; the floor of the decay, "
                         f"e.g. lr / 10 = {config.lr / 10:g}")


def _check_budget(config: TrainConfig) -> None:
    if config.train_iters is None and config.train_tokens is None:
        raise ValueError("set train_iters or train_tokens (a token budget); neither is set")
    if config.train_iters is not None and config.train_tokens is not None:
        raise ValueError(
            f"train_iters={config.train_iters} and train_tokens={config.train_tokens} are both set; keep one"
        )
    if config.global_batch_size % config.micro_batch_size:
        raise ValueError(
            f"global_batch_size={config.global_batch_size} is not a multiple of micro_batch_size="
            f"{config.micro_batch_size}; choose a global batch that is a multiple of micro_batch_size x data-parallel "
            f"ranks"
        )
    if config.lr_decay_iters is not None and config.lr_decay_iters <= config.warmup_iters:
        raise ValueError(
            f"lr_decay_iters={config.lr_decay_iters} must be > warmup_iters={config.warmup_iters} (the decay runs "
            f"from the end of warmup to lr_decay_iters); raise it, or set it to none to decay over train_iters"
        )
    if config.expert_parallel_size > 1 and config.zero_stage == 3:
        raise ValueError(
            f"expert_parallel_size={config.expert_parallel_size} with zero_stage=3 is not supported (DeepSpeed "
            f"refuses MoE under ZeRO-3); use zero_stage 1 or 2 with expert parallelism, or expert_parallel_size 1 "
            f"with ZeRO-3 (which then shards the experts like any other weight)"
        )


def check_directory_path(name: str, value: str) -> None:
    """A directory the run creates or writes in: refuse what would fail later with a traceback (or write elsewhere)."""
    if not value.strip():
        raise ValueError(f"{name}={value!r} is empty; give a directory path, e.g. --{name} runs/my_run")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name}={value!r} is an existing file, not a directory; choose a directory path (a new "
                         f"one, or the run's own directory)")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{name}={value!r}: {str(parent)!r} on its path is a file, not a directory; choose another "
                         f"path")
    if not os.access(parent if not path.exists() else path, os.W_OK | os.X_OK):
        raise ValueError(f"{name}={value!r}: no permission to write in {str(parent if not path.exists() else path)!r}"
                         f"; choose a writable location")


def _check_paths(config: TrainConfig) -> None:
    check_directory_path("output_dir", config.output_dir)
    if config.data_cache_dir is not None:
        check_directory_path("data_cache_dir", config.data_cache_dir)
    if config.resume not in ("none", "auto") and not Path(config.resume).is_dir():
        raise ValueError(f"resume={config.resume!r}: not 'none', 'auto' or an existing checkpoint directory; "
                         f"use --resume auto to continue the newest checkpoint in output_dir")
    if config.tokenizer is not None and not (Path(config.tokenizer) / "tokenizer.json").is_file():
        raise ValueError(
            f"tokenizer={config.tokenizer!r}: no tokenizer.json there; pass an HF tokenizer directory (train one with "
            f"python -m llm.data.tokenizer train --input FILES --vocab-size N --out DIR)"
        )
    if config.ds_config is not None:
        from runtime.ds_config import resolve_ds_config_path

        resolve_ds_config_path(config.ds_config)


def _check_data(config: TrainConfig) -> None:
    from llm.data.gpt_dataset import normalize_weights, parse_data_path, parse_split

    if config.data_path:
        try:
            prefixes, weights = parse_data_path(config.data_path)
            normalize_weights(weights, prefixes)
        except ValueError as err:
            raise ValueError(f"data_path: {err}") from None
    if config.split is not None and parse_split(config.split)[0] == 0:
        raise ValueError(f"split={config.split!r} leaves no documents for training; give the train part a positive "
                         f"weight, e.g. '969,30,1'")


def _check_model(config: TrainConfig) -> None:
    """Build the model config (preset <- model_overrides) as the trainer will, so that an unknown override key, a value
    of the wrong type or a shape that cannot work is refused now, before anything is written."""
    from llm.model.presets import load_model_config

    if not isinstance(config.model_overrides, dict):
        raise ValueError(f"model_overrides={config.model_overrides!r} must be a mapping of model config keys")
    model_config = load_model_config(config.model, **config.model_overrides)
    if config.seq_len > model_config.max_position_embeddings:
        raise ValueError(
            f"seq_len={config.seq_len} exceeds the model's max_position_embeddings="
            f"{model_config.max_position_embeddings}; lower seq_len or raise it "
            f"(--model_overrides '{{\"max_position_embeddings\": {config.seq_len}}}')"
        )
    ep = config.expert_parallel_size
    if ep > 1:
        num_experts = getattr(model_config, "num_experts", None)
        if num_experts is None:
            raise ValueError(f"expert_parallel_size={ep} needs a ParameterNet model (with MoE projections), but "
                             f"model={config.model!r} has no experts; use a parameternet-llama-* model or 1")
        if num_experts % ep:
            raise ValueError(f"expert_parallel_size={ep} does not divide num_experts={num_experts}; choose a divisor "
                             f"of {num_experts}")
    if config.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package, which is not "
                         "installed (pip install -e '.[gpu]' on a CUDA machine); use sdpa (flash kernels on CUDA too)")


def validate(config: TrainConfig) -> None:
    """Refuse a config that cannot train, with one line naming the field, the value and the fix. Reads, never writes."""
    _check_numbers(config)
    _check_budget(config)
    _check_paths(config)
    _check_data(config)
    _check_model(config)


def warnings_for(config: TrainConfig) -> list[str]:
    """Settings that run but probably not as meant: printed at start, not refused (short test runs rely on them)."""
    notes = []
    iters = config.resolved_train_iters()
    if config.warmup_iters > iters:
        notes.append(f"warmup_iters={config.warmup_iters} > train_iters={iters}: the learning rate never reaches "
                     f"lr={config.lr:g}; lower --warmup_iters to at most {iters}")
    return notes


def read_yaml_mapping(file: Path) -> dict[str, Any]:
    """A YAML file of `key: value` lines; what is wrong with it, as one line naming the file (and line)."""
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        problem = " ".join(str(err.problem or "parse error").split())
        if err.context and err.context_mark:  # where the broken construct began, e.g. an unclosed [ lines above
            problem = f"{' '.join(err.context.split())} at line {err.context_mark.line + 1}: {problem}"
        raise ValueError(f"{where}: not valid YAML ({problem}); write one `key: value` per line") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{file}: not valid YAML ({' '.join(str(err).split())})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text (byte {err.start}); a config is a YAML text file") from None
    except OSError as err:
        raise ValueError(f"{file}: cannot read the config ({err.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a mapping of config keys (`key: value` lines), got {type(data).__name__}")
    return data


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
        data = read_yaml_mapping(file)
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


# --- printing config errors (both training CLIs) --------------------------------------------------------------------


def print_error(message: str, kind: str = "error", prog: str | None = None) -> None:
    """`[prog: ]error: MESSAGE` as one line in one write, flushed: ranks share a terminal or a log file, and a line
    written in pieces (print writes the text and the newline separately) interleaves with another rank's."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    line = f"{prog + ': ' if prog else ''}{kind}: {text}\n"
    sys.stdout.flush()
    sys.stderr.write(line)
    sys.stderr.flush()


def first_rank_on_node(argv: list[str] | None = None) -> bool:
    """Is this the node's local rank 0? Every rank reads the same command line and config, so a config error is
    printed once per node (by this rank) rather than once per rank."""
    from runtime.slurm import rank_env

    env = {**os.environ, **rank_env(os.environ)}
    for key in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"):
        if env.get(key, "").strip().isdigit():
            return int(env[key]) == 0
    for arg in argv or []:  # the deepspeed launcher's --local_rank=N (it sets LOCAL_RANK too)
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            return arg.split("=", 1)[1].strip() in ("", "0")
    return True
