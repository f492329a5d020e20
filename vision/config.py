"""The vision training config: one dataclass, filled from a YAML preset and then from CLI flags that mirror it.

Every field is a flag of the same name (`micro_batch_size` <-> `--micro-batch-size`), so a preset is a saved command
line. Unknown YAML keys and values of the wrong type are refused with the field named.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from llm.train.config import check_directory_path, first_rank_on_node, print_error, read_yaml_mapping

PRESET_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class TrainConfig:
    # --- model -----------------------------------------------------------------------------------------------------
    model: str = "parameternet_tiny"  # any timm name; ours: parameternet_{600m,300m,tiny}, ghostnet_{600m,300m,tiny}
    num_experts: int | None = None  # override the experts of a parameternet_* model (None = its default, 4)
    num_classes: int | None = None  # None = the number of classes in the training set
    in_chans: int = 3  # 1 trains on grayscale images directly
    img_size: int = 224
    drop_rate: float = 0.2  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth, linear over the blocks
    init_from: str | None = None  # stage 2: a previous run dir or .safetensors file; the classifier is re-initialised
    init_from_ema: bool = False  # with a run dir: start from its EMA weights
    keep_classifier: bool = False  # with init_from: load its classifier too (same label set); default: a fresh one

    # --- data ------------------------------------------------------------------------------------------------------
    dataset: str = "folder"  # "folder" (ImageFolder tree: data_dir/<split>/<class>/*.jpg) or torch/<name> (timm)
    data_dir: str = ""  # for torch/fashion_mnist, "" = Debian's dataset-fashion-mnist, unpacked into $PNET_DATA_DIR
    train_split: str = "train"
    val_split: str = "validation"  # folder: also found as val/, valid/, eval/
    train_subset: int = 0  # use a fixed, seeded subset of this many training images (0 = all)
    val_subset: int = 0
    mean: list[float] | None = None  # None = the model's (ImageNet) statistics
    std: list[float] | None = None
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # evaluation centre crop
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    hflip: float = 0.5
    color_jitter: float = 0.4  # only used without auto_augment
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; None = off
    re_prob: float = 0.25  # random erasing probability
    mixup: float = 0.8  # Mixup alpha (0 = off)
    cutmix: float = 1.0  # CutMix alpha (0 = off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    num_workers: int = 2  # data-loading processes per rank

    # --- optimisation ----------------------------------------------------------------------------------------------
    epochs: int = 90  # the LR schedule spans this many epochs
    max_steps: int = 0  # stop after this many optimizer steps (0 = train all epochs)
    global_batch_size: int = 4096  # = micro_batch_size x ranks x gradient accumulation
    micro_batch_size: int = 128  # per rank and forward pass
    lr: float = 2e-3  # peak AdamW LR at global_batch_size (scaled per layer by layer_decay)
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of lr
    warmup_epochs: float = 5.0  # linear warmup, then cosine
    weight_decay: float = 0.05  # not applied to norms and biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    layer_decay: float | None = None  # layer-wise LR decay per depth of model.blocks (fine-tuning: 0.5)
    clip_grad: float = 5.0  # max global grad norm (0 = off)
    precision: str = "fp32"  # fp32 | bf16 (bf16 is ~30x slower on CPUs without native bf16)
    zero_stage: int = 1  # 0, 1 or 2
    ds_config: str = "zero1"  # base DeepSpeed JSON in runtime/ds_configs/ (buckets, offload); batch/optimizer come from here
    ema: bool = False
    ema_decay: float = 0.9998

    # --- run -------------------------------------------------------------------------------------------------------
    output_dir: str = "runs/vision"
    seed: int = 42
    log_every: int = 10  # steps
    eval_every: int = 1  # epochs
    save_every: int = 0  # steps between checkpoints (0 = at every epoch end only)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from output_dir/checkpoints/latest when it exists
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _field_comments() -> dict[str, str]:
    """The `# ...` comment after each field above, reused as its --help text (one place to document a field)."""
    comments = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        match = re.match(r"\s+(\w+): [^#]+#\s*(.+)$", line)
        if match and match.group(1) in FIELDS:
            comments[match.group(1)] = match.group(2)
    return comments


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _base_type(hint: Any) -> tuple[type, bool, bool]:
    """(element type, optional, is_list) for the few hint shapes the config uses."""
    optional = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        optional = type(None) in args
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def _coerce(name: str, value: Any, source: str) -> Any:
    hint = _HINTS[name]
    base, optional, is_list = _base_type(hint)

    def bad() -> ValueError:
        example = getattr(TrainConfig(), name)
        return ValueError(f"{source}: {name}={value!r} must be of type {_describe(hint)}; e.g. {name}: {example!r}")

    if value is None:
        if optional:
            return None
        raise bad()
    if is_list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        try:
            return [base(v) for v in value]
        except (TypeError, ValueError):
            raise bad() from None
    if base is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            raise bad() from None
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is str and isinstance(value, str):
        return value
    raise bad()


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    unknown = sorted(set(values) - set(FIELDS), key=str)
    if unknown:
        close = [m for key in unknown for m in difflib.get_close_matches(str(key), FIELDS, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"{source}: unknown field(s) {unknown}{hint}; valid fields: {', '.join(FIELDS)} (see vision/config.py)"
        )
    return TrainConfig(**{k: _coerce(k, v, source) for k, v in values.items()})


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A preset by path, or by name from vision/configs/ (`fashion_mnist_tiny`)."""
    candidate = Path(path)
    if not candidate.is_file():
        named = PRESET_DIR / f"{path}.yaml"
        if not named.is_file():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"config: {path!r} is neither a file nor a preset in vision/configs/ {known}")
        candidate = named
    return read_yaml_mapping(candidate)


def _parse_optional(base: type):
    def parse(text: str) -> Any:
        if text.lower() in ("none", "null"):
            return None
        return base(text)

    return parse


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints its usage before the error; under a launcher every rank would. One line, once per node."""

    def error(self, message: str) -> NoReturn:
        if first_rank_on_node(sys.argv[1:]):
            print_error(message, prog="vision.train")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m vision.train",
        description="Train a timm image classifier (ParameterNet or its static twin) on the DeepSpeed engine.",
    )
    parser.add_argument("--config", help="YAML preset (a path, or a name in vision/configs/); flags override it")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    comments = _field_comments()
    defaults = TrainConfig()
    for name in FIELDS:
        base, optional, is_list = _base_type(_HINTS[name])
        flag = "--" + name.replace("_", "-")
        text = f"{comments.get(name, '')} (default: {getattr(defaults, name)!r})".strip()
        text = text.replace("%", "%%")
        if base is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif is_list:
            parser.add_argument(
                flag, dest=name, nargs="+", type=base, default=None, metavar=base.__name__.upper(), help=text
            )
        else:
            parse = _parse_optional(base) if optional else base
            parser.add_argument(flag, dest=name, type=parse, default=None, metavar=base.__name__.upper(), help=text)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """defaults < YAML preset < command-line flags."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        values: dict[str, Any] = load_yaml(args.config) if args.config else {}
        source = f"config {args.config}" if args.config else "config"
        cfg = config_from_dict(values, source)
        overrides = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
        # Flags may set an optional field back to None ("--layer-decay none"): argparse cannot tell that from "not
        # given".
        for name in FIELDS:
            flag = "--" + name.replace("_", "-")
            if flag in argv and getattr(args, name) is None:
                overrides[name] = None
        return dataclasses.replace(cfg, **{k: _coerce(k, v, "command line") for k, v in overrides.items()})
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


DATASET_PREFIXES = ("torch/",)


def validate(cfg: TrainConfig) -> None:
    """Refuse a config that cannot train, naming the field, the value and the fix. Does not touch the data."""
    import timm

    from vision.models import MODEL_NAMES, check_input_size

    _check_finite(cfg)
    if not timm.is_model(cfg.model):
        raise ValueError(
            f"model={cfg.model!r} is not a registered timm model; ours: {', '.join(MODEL_NAMES)} "
            f"(or any name from timm.list_models())"
        )
    if cfg.img_size < 1:
        raise ValueError(f"img_size={cfg.img_size} must be >= 1 (e.g. 224)")
    if cfg.model in MODEL_NAMES:
        check_input_size(cfg.img_size, cfg.model)
    elif cfg.img_size < 8:
        raise ValueError(f"img_size={cfg.img_size} is too small; use at least 32")
    if cfg.num_experts is not None and cfg.num_experts < 1:
        raise ValueError(f"num_experts={cfg.num_experts} must be >= 1 (for plain convolutions use the ghostnet_* twin)")
    if cfg.num_classes is not None and cfg.num_classes < 1:
        raise ValueError(f"num_classes={cfg.num_classes} must be >= 1, or null to take it from the training set")
    if cfg.in_chans not in (1, 3):
        raise ValueError(f"in_chans={cfg.in_chans} must be 1 (grayscale) or 3 (RGB)")
    if cfg.dataset != "folder" and not cfg.dataset.startswith(DATASET_PREFIXES):
        raise ValueError(
            f"dataset={cfg.dataset!r} must be 'folder' (an ImageFolder tree under data_dir) or a timm torchvision "
            f"dataset such as 'torch/fashion_mnist' or 'torch/cifar10'"
        )
    if cfg.dataset == "folder" and not cfg.data_dir:
        raise ValueError("data_dir is empty: dataset='folder' needs data_dir=<root with train/ and validation/ trees>")
    for name in ("mean", "std"):
        value = getattr(cfg, name)
        if value is not None and len(value) != cfg.in_chans:
            raise ValueError(f"{name}={value} has {len(value)} values; in_chans={cfg.in_chans} needs one per channel")
    if len(cfg.scale) != 2 or not 0 < cfg.scale[0] <= cfg.scale[1] <= 1:
        raise ValueError(f"scale={cfg.scale} must be two fractions 0 < min <= max <= 1")
    if cfg.std is not None and min(cfg.std) <= 0:
        raise ValueError(f"std={cfg.std} must hold values > 0 (inputs are divided by them), or null for the model's")
    for name in ("hflip", "re_prob", "mixup_prob", "mixup_switch_prob", "label_smoothing", "drop_rate",
                 "drop_path_rate"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be within [0, 1]")
    if not 0 < cfg.crop_pct <= 1:
        raise ValueError(f"crop_pct={cfg.crop_pct} must be within (0, 1] (1 = no crop; 0.875 is usual)")
    for name in ("color_jitter", "mixup", "cutmix"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 0 (0 = off)")
    _check_augmentation(cfg)
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.micro_batch_size % 2:
        raise ValueError(
            f"micro_batch_size={cfg.micro_batch_size} is odd, but Mixup/CutMix mix each batch with its reverse; "
            f"use an even micro batch or set mixup: 0 and cutmix: 0"
        )
    for name in ("epochs", "micro_batch_size", "global_batch_size", "log_every", "eval_every", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1")
    for name in ("max_steps", "save_every", "train_subset", "val_subset", "num_workers", "warmup_epochs", "clip_grad"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 0")
    if cfg.global_batch_size % cfg.micro_batch_size:
        raise ValueError(
            f"global_batch_size={cfg.global_batch_size} is not a multiple of micro_batch_size={cfg.micro_batch_size}; "
            f"choose a global batch that is a multiple of micro_batch_size x data-parallel ranks"
        )
    if cfg.seed < 0:
        raise ValueError(f"seed={cfg.seed} must be >= 0")
    if cfg.lr <= 0:
        raise ValueError(f"lr={cfg.lr} must be > 0 (the peak AdamW LR, e.g. 2e-3)")
    if cfg.weight_decay < 0:
        raise ValueError(f"weight_decay={cfg.weight_decay} must be >= 0 (0 = off)")
    if cfg.eps <= 0:
        raise ValueError(f"eps={cfg.eps} must be > 0 (e.g. 1e-8)")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio={cfg.min_lr_ratio} must be within [0, 1]")
    if cfg.layer_decay is not None and not 0 < cfg.layer_decay <= 1:
        raise ValueError(f"layer_decay={cfg.layer_decay} must be within (0, 1], or null for none")
    if not 0 < cfg.ema_decay < 1:
        raise ValueError(f"ema_decay={cfg.ema_decay} must be within (0, 1)")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise ValueError(f"betas={cfg.betas} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={cfg.precision!r} must be 'fp32' or 'bf16' (fp16 is not supported here)")
    if cfg.zero_stage not in (0, 1, 2):
        raise ValueError(
            f"zero_stage={cfg.zero_stage} must be 0, 1 or 2 (ZeRO-3 partitions parameters, which the per-sample "
            f"kernels of dynamic convolutions would gather every layer)"
        )
    if cfg.init_from is None and (cfg.init_from_ema or cfg.keep_classifier):
        flag = "init_from_ema" if cfg.init_from_ema else "keep_classifier"
        raise ValueError(f"{flag}=true needs init_from (a previous run directory or .safetensors file); set it, "
                         f"or drop {flag}")
    from runtime.ds_config import resolve_ds_config_path

    resolve_ds_config_path(cfg.ds_config)
    check_directory_path("output_dir", cfg.output_dir)


INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos")


def _check_finite(cfg: TrainConfig) -> None:
    """nan/inf slip through every range check (each comparison with nan is false): refuse them first, by name."""
    for name in FIELDS:
        base, _, is_list = _base_type(_HINTS[name])
        value = getattr(cfg, name)
        if base is not float or value is None:
            continue
        if not all(math.isfinite(v) for v in (value if is_list else [value])):
            example = getattr(TrainConfig(), name)
            raise ValueError(f"{name}={value} must be finite (no nan or inf); e.g. {name}: {example}")


def _check_augmentation(cfg: TrainConfig) -> None:
    """timm refuses a bad interpolation or augmentation spec with a KeyError or an assert deep in the data set-up."""
    from timm.data import create_transform

    if cfg.interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={cfg.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    if cfg.auto_augment is not None:
        try:
            create_transform(32, is_training=True, auto_augment=cfg.auto_augment)
        except (AssertionError, ValueError, KeyError, IndexError) as err:
            raise ValueError(
                f"auto_augment={cfg.auto_augment!r} is not a timm augmentation spec ({err}); e.g. "
                f"'rand-m9-mstd0.5-inc1' (RandAugment), 'augmix-m5-w3', 'original', or null for none"
            ) from None
