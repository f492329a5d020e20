"""The vision training config: one dataclass, YAML presets in vision/configs/ that mirror it, `--key value` flags.

The same engine (runtime.config) and the same vocabulary as the LLM trainer: `--micro_batch_size 64` (or
`--micro-batch-size 64`), `--ema true`, `--scale 0.5 1.0`, `--layer_decay none`; grad_clip, log_interval,
save_interval, keep_last, train_iters, adam_beta1/adam_beta2/adam_eps, min_lr, progress_bar, tensorboard, resume and
ds_config mean what they mean there. RESUME_POLICY says what a resume does when a field's value changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.checks import MAX_SEED, FloatRange, check_directory_path, check_min_lr, check_resume
from runtime.config import ALLOW, IGNORE, REFUSE, ConfigEngine, opt

PRESET_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class TrainConfig:
    model: str = opt(
        "parameternet_tiny",
        "any timm name; ours: parameternet_{600m,300m,tiny}, ghostnet_{600m,300m,tiny}",
        section="model",
    )
    num_experts: int | None = opt(None, "override the experts of a parameternet_* model (None = its default, 4)")
    num_classes: int | None = opt(None, "None = the number of classes in the training set")
    in_chans: int = opt(3, "image channels; 1 trains on grayscale images directly", choices=(1, 3))
    img_size: int = opt(224, "training and evaluation resolution")
    drop_rate: float = opt(0.2, "dropout before the classifier")
    drop_path_rate: float = opt(0.0, "stochastic depth, linear over the blocks")
    init_from: str | None = opt(
        None, "stage 2: a previous run dir or .safetensors file; the classifier is re-initialised"
    )
    init_from_ema: bool = opt(False, "with a run dir: start from its EMA weights")
    keep_classifier: bool = opt(False, "with init_from: load its classifier too (same label set); default: a fresh one")

    dataset: str = opt(
        "folder", '"folder" (ImageFolder tree: data_dir/<split>/<class>/*.jpg) or torch/<name> (timm)', section="data"
    )
    data_dir: str = opt(
        "", 'for torch/fashion_mnist, "" = Debian\'s dataset-fashion-mnist, unpacked into $PNET_DATA_DIR'
    )
    train_split: str = opt("train", "the training split's folder (or torchvision split)")
    val_split: str = opt("validation", "folder: also found as val/, valid/, eval/")
    train_subset: int = opt(0, "use a fixed, seeded subset of this many training images (0 = all)")
    val_subset: int = opt(0, "the same for the validation images (0 = all)")
    mean: list[float] | None = opt(None, "per channel; None = the model's (ImageNet) statistics")
    std: list[float] | None = opt(None, "per channel; None = the model's")
    interpolation: str = opt(
        "bicubic", "the resize filter", choices=("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos")
    )
    crop_pct: float = opt(0.875, "evaluation centre crop")
    scale: list[float] = opt(help="RandomResizedCrop area range", factory=lambda: [0.08, 1.0])
    hflip: float = opt(0.5, "horizontal flip probability")
    color_jitter: float = opt(0.4, "only used without auto_augment")
    auto_augment: str | None = opt("rand-m9-mstd0.5-inc1", "timm RandAugment spec; None = off")
    re_prob: float = opt(0.25, "random erasing probability")
    mixup: float = opt(0.8, "Mixup alpha (0 = off)")
    cutmix: float = opt(1.0, "CutMix alpha (0 = off)")
    mixup_prob: float = opt(1.0, "probability of mixing a batch at all")
    mixup_switch_prob: float = opt(0.5, "probability of CutMix instead of Mixup when both are on")
    label_smoothing: float = opt(0.1, "also folded into Mixup's soft targets")
    num_workers: int = opt(2, "data-loading processes per rank")
    skip_bad_images: bool = opt(False, "false: an unreadable image file stops the run, named; true: skip it (counted)")

    epochs: int = opt(90, "the LR schedule spans this many epochs", section="optimisation")
    train_iters: int | None = opt(None, "stop after this many steps (None = all epochs); the schedule spans the epochs")
    global_batch_size: int = opt(4096, "= micro_batch_size x ranks x gradient accumulation")
    micro_batch_size: int = opt(128, "per rank and forward pass")
    lr: float = opt(2e-3, "peak AdamW LR at global_batch_size (scaled per layer by layer_decay)")
    min_lr: float = opt(2e-5, "the floor of the cosine decay, in [0, lr] (with layer_decay: scaled per layer too)")
    warmup_epochs: float = opt(5.0, "linear warmup, then cosine")
    weight_decay: float = opt(0.05, "not applied to norms and biases")
    adam_beta1: float = opt(0.9, "AdamW's beta1")
    adam_beta2: float = opt(0.999, "AdamW's beta2")
    adam_eps: float = opt(1e-8, "AdamW's epsilon")
    layer_decay: float | None = opt(None, "layer-wise LR decay per depth of model.blocks (fine-tuning: 0.5)")
    grad_clip: float = opt(5.0, "max global grad norm (0 = off)")
    precision: str = opt("fp32", "bf16 is ~30x slower on CPUs without native bf16", choices=("fp32", "bf16"))
    zero_stage: int = opt(1, "the ZeRO stage: what is sharded over the ranks", choices=(0, 1, 2))
    ds_config: str | None = opt(None, "base DeepSpeed JSON in ds_configs/ or a path; None = zero<zero_stage>")
    ema: bool = opt(False, "keep an exponential moving average of the weights (evaluated and saved too)")
    ema_decay: float = opt(0.9998, "EMA decay per optimizer step")

    output_dir: str = opt("runs/vision", "the run directory: config, metrics, checkpoints, weights", section="run")
    seed: int = opt(42, "weights, sample order, augmentation: all functions of it")
    log_interval: int = opt(10, "steps between train records")
    eval_interval_epochs: int = opt(1, "epochs between validations (and always after the last one)")
    save_interval: int = opt(0, "steps between checkpoints (0 = only at epoch ends)")
    keep_last: int = opt(2, "checkpoints kept")
    resume: str = opt("auto", "auto = continue output_dir's newest checkpoint if any | none | <checkpoint directory>")
    progress_bar: bool = opt(True, "tqdm bar on rank 0")
    tensorboard: bool = opt(True, "the metrics also as TensorBoard scalars in <output_dir>/tensorboard")
    wandb_project: str | None = opt(
        None,
        "also log the metrics and the resolved config to this Weights & Biases project (pip install "
        "'parameternet[wandb]'); WANDB_MODE=offline keeps them in <output_dir>/wandb for `wandb sync`",
    )
    wandb_entity: str | None = opt(None, "the W&B team or user (default: the logged-in user's)")
    wandb_run_name: str | None = opt(None, "the W&B run's name (default: the output_dir's name)")
    wandb_tags: list[str] = opt(help="the W&B run's tags", factory=list)


_PROBABILITY = "a probability"
# The smallest valid value of each integer field (None, where allowed, means "not set"), and what the edge means.
INT_MINIMUMS = {
    "num_experts": (1, " (for plain convolutions use the ghostnet_* twin)"),
    "num_classes": (1, " (or none: the number of classes in the training set)"),
    "img_size": (1, " (e.g. 224)"),
    "train_subset": (0, " (0 = all)"),
    "val_subset": (0, " (0 = all)"),
    "num_workers": (0, " (0 = load in the training process)"),
    "epochs": (1, ""),
    "train_iters": (1, " (or none: all epochs)"),
    "global_batch_size": (1, ""),
    "micro_batch_size": (1, ""),
    "seed": (0, ""),
    "log_interval": (1, ""),
    "eval_interval_epochs": (1, ""),
    "save_interval": (0, " (0 = only at epoch ends)"),
    "keep_last": (1, ""),
}
INT_MAXIMUMS = {"seed": (MAX_SEED, f"2**32 - 1 = {MAX_SEED}")}
# Each float field's valid range and the fix that goes with it (min_lr: within [0, lr], checked after lr).
FLOAT_RANGES = {
    "drop_rate": FloatRange(0.0, True, 1.0, True, "dropout before the classifier, e.g. 0.2"),
    "drop_path_rate": FloatRange(0.0, True, 1.0, True, "stochastic depth, e.g. 0.1"),
    "crop_pct": FloatRange(0.0, False, 1.0, True, "1 = no crop; 0.875 is usual"),
    "hflip": FloatRange(0.0, True, 1.0, True, _PROBABILITY),
    "color_jitter": FloatRange(0.0, True, math.inf, False, "0 = off; e.g. 0.4"),
    "re_prob": FloatRange(0.0, True, 1.0, True, _PROBABILITY),
    "mixup": FloatRange(0.0, True, math.inf, False, "the Mixup alpha; 0 = off, e.g. 0.8"),
    "cutmix": FloatRange(0.0, True, math.inf, False, "the CutMix alpha; 0 = off, e.g. 1.0"),
    "mixup_prob": FloatRange(0.0, True, 1.0, True, _PROBABILITY),
    "mixup_switch_prob": FloatRange(0.0, True, 1.0, True, _PROBABILITY),
    "label_smoothing": FloatRange(0.0, True, 1.0, True, "e.g. 0.1"),
    "lr": FloatRange(0.0, False, math.inf, False, "the peak AdamW learning rate, e.g. 2e-3"),
    "warmup_epochs": FloatRange(0.0, True, math.inf, False, "0 = no warmup; e.g. 5"),
    "weight_decay": FloatRange(0.0, True, math.inf, False, "0 turns it off; 0.05 is usual"),
    "adam_beta1": FloatRange(0.0, True, 1.0, False, "e.g. 0.9"),
    "adam_beta2": FloatRange(0.0, True, 1.0, False, "e.g. 0.999"),
    "adam_eps": FloatRange(0.0, False, math.inf, False, "e.g. 1e-8"),
    "layer_decay": FloatRange(0.0, False, 1.0, True, "fine-tuning uses 0.5; none turns it off"),
    "grad_clip": FloatRange(0.0, True, math.inf, False, "the max global gradient norm; 0 turns clipping off"),
    "ema_decay": FloatRange(0.0, False, 1.0, False, "e.g. 0.9998"),
}
EXAMPLES = {
    "num_experts": "4",
    "num_classes": "1000",
    "init_from": "runs/vision/stage1",
    "mean": "0.5 0.5 0.5",
    "std": "0.25 0.25 0.25",
    "train_iters": "1000",
    "layer_decay": "0.5",
    "ds_config": "zero1",
    "data_dir": "/data/imagenet",
}
# The vision trainer's flags before the shared vocabulary: an old flag is answered with its new name.
RENAMED = {
    "clip_grad": "grad_clip",
    "log_every": "log_interval",
    "keep_checkpoints": "keep_last",
    "save_every": "save_interval",
    "eval_every": "eval_interval_epochs",
    "max_steps": "train_iters",
    "betas": "adam_beta1 and adam_beta2",
    "eps": "adam_eps",
    "min_lr_ratio": "min_lr, an absolute learning rate (lr x the ratio)",
    "progress": "progress_bar",
}
ENGINE: ConfigEngine[TrainConfig] = ConfigEngine(
    TrainConfig,
    preset_dir=PRESET_DIR,
    prog="vision.train",
    int_minimums=INT_MINIMUMS,
    int_maximums=INT_MAXIMUMS,
    float_ranges=FLOAT_RANGES,
    examples=EXAMPLES,
    renamed=RENAMED,
)
FIELDS = ENGINE.fields

# How a resume treats each field whose value differs from the config saved with the checkpoint (runtime.checkpoint;
# REFUSE / ALLOW / IGNORE as in llm/train/config.py). tests/test_vision_config.py fails when a field is missing here.
_ARCH = "the architecture of the saved weights"
_DATA = "the position in the data that the checkpoint holds (sample order and augmentation are functions of it)"
_OPT = "the saved optimizer state was accumulated under it"
_SCHEDULE = "the LR schedule already followed (the LR would jump)"
_AUG = "the augmentation of the steps to come (the steps done keep theirs)"
RESUME_POLICY: dict[str, tuple[str, str]] = {
    "model": (REFUSE, _ARCH),
    "num_experts": (REFUSE, _ARCH),
    "num_classes": (REFUSE, _ARCH),
    "in_chans": (REFUSE, _ARCH),
    "img_size": (REFUSE, "the resolution the weights were trained at"),
    "drop_rate": (ALLOW, "a regulariser applied to each new step"),
    "drop_path_rate": (ALLOW, "a regulariser applied to each new step"),
    "init_from": (IGNORE, "where the first step started from; a resume continues from the checkpoint"),
    "init_from_ema": (IGNORE, "where the first step started from"),
    "keep_classifier": (IGNORE, "where the first step started from"),
    "dataset": (REFUSE, _DATA),
    "data_dir": (ALLOW, "where the same data lies (a data set may be moved)"),
    "train_split": (REFUSE, _DATA),
    "val_split": (ALLOW, "what the evaluations measure"),
    "train_subset": (REFUSE, _DATA),
    "val_subset": (ALLOW, "what the evaluations measure"),
    "mean": (REFUSE, "the input normalisation the weights were trained with"),
    "std": (REFUSE, "the input normalisation the weights were trained with"),
    "interpolation": (ALLOW, _AUG),
    "crop_pct": (ALLOW, "evaluation only"),
    "scale": (ALLOW, _AUG),
    "hflip": (ALLOW, _AUG),
    "color_jitter": (ALLOW, _AUG),
    "auto_augment": (ALLOW, _AUG),
    "re_prob": (ALLOW, _AUG),
    "mixup": (ALLOW, _AUG),
    "cutmix": (ALLOW, _AUG),
    "mixup_prob": (ALLOW, _AUG),
    "mixup_switch_prob": (ALLOW, _AUG),
    "label_smoothing": (ALLOW, "the targets of the steps to come"),
    "num_workers": (ALLOW, "speed only: samples are functions of (seed, epoch, position)"),
    "skip_bad_images": (ALLOW, "what to do with an unreadable image from now on; skipped ones are counted"),
    "epochs": (REFUSE, _SCHEDULE + " and the sample order of each epoch"),
    "train_iters": (ALLOW, "stopping earlier or later; the schedule spans epochs"),
    "global_batch_size": (REFUSE, _DATA),
    "micro_batch_size": (REFUSE, _DATA + "; the per-rank Mixup pairs depend on it"),
    "lr": (REFUSE, _SCHEDULE),
    "min_lr": (ALLOW, "the tail of the LR schedule"),
    "warmup_epochs": (REFUSE, _SCHEDULE),
    "weight_decay": (REFUSE, _OPT),
    "adam_beta1": (REFUSE, _OPT),
    "adam_beta2": (REFUSE, _OPT),
    "adam_eps": (REFUSE, _OPT),
    "layer_decay": (REFUSE, "the per-layer learning rates of the saved optimizer groups"),
    "grad_clip": (ALLOW, "a stabiliser applied to each new step"),
    "precision": (REFUSE, "the layout of the optimizer state (fp32 master weights under bf16)"),
    "zero_stage": (REFUSE, "the layout of the optimizer state (sharded by ZeRO stage)"),
    "ds_config": (ALLOW, "engine settings; the ZeRO stage and precision come from zero_stage and precision"),
    "ema": (REFUSE, "the EMA weights the checkpoint holds (or lacks)"),
    "ema_decay": (ALLOW, "the averaging of each new step"),
    "output_dir": (IGNORE, "where the run is (a run may be moved)"),
    "seed": (REFUSE, _DATA),
    "log_interval": (ALLOW, "how often"),
    "eval_interval_epochs": (ALLOW, "how often"),
    "save_interval": (ALLOW, "how often"),
    "keep_last": (ALLOW, "how many checkpoints stay"),
    "resume": (IGNORE, "how this run was started"),
    "progress_bar": (ALLOW, "display only"),
    "tensorboard": (ALLOW, "display only"),
    "wandb_project": (ALLOW, "where the metrics also go"),
    "wandb_entity": (ALLOW, "where the metrics also go"),
    "wandb_run_name": (ALLOW, "display only"),
    "wandb_tags": (ALLOW, "display only"),
}

DATASET_PREFIXES = ("torch/",)


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, cli_overrides: list[str] | None = None
) -> TrainConfig:
    """Defaults <- YAML file (a preset name in vision/configs/ or a path) <- `overrides` <- `--key value` pairs;
    validated."""
    config = ENGINE.load(path, overrides, cli_overrides)
    validate(config)
    return config


def parse_config(argv: list[str]) -> TrainConfig:
    """The config of a `python -m vision.train` command line (`--config PRESET` and `--key value` pairs)."""
    config_path, pairs, _ = ENGINE.split_argv(argv)
    return load_config(config_path, cli_overrides=pairs)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return ENGINE.to_dict(cfg)


def validate(cfg: TrainConfig) -> None:
    """Refuse a config that cannot train, naming the field, the value and the fix. Does not touch the data."""
    import timm

    from vision.models import MODEL_NAMES, check_input_size

    if cfg.zero_stage == 3:  # before the generic choice check: the reason is worth saying
        raise ValueError(
            "zero_stage=3 is not supported here: ZeRO-3 partitions parameters, which the per-sample "
            "kernels of dynamic convolutions would gather every layer; use --zero_stage 1 or 2"
        )
    ENGINE.check_ranges(cfg)
    check_min_lr(cfg.lr, cfg.min_lr)
    if not timm.is_model(cfg.model):
        raise ValueError(
            f"model={cfg.model!r} is not a registered timm model; ours: {', '.join(MODEL_NAMES)} "
            f"(or any name from timm.list_models())"
        )
    if cfg.model in MODEL_NAMES:
        check_input_size(cfg.img_size, cfg.model)
    elif cfg.img_size < 8:
        raise ValueError(f"img_size={cfg.img_size} is too small; use at least 32")
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
        raise ValueError(f"scale={cfg.scale} must be two fractions 0 < min <= max <= 1, e.g. --scale 0.08 1.0")
    if cfg.std is not None and min(cfg.std) <= 0:
        raise ValueError(f"std={cfg.std} must hold values > 0 (inputs are divided by them), or none for the model's")
    _check_augmentation(cfg)
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.micro_batch_size % 2:
        raise ValueError(
            f"micro_batch_size={cfg.micro_batch_size} is odd, but Mixup/CutMix mix each batch with its reverse; "
            f"use an even micro batch or --mixup 0 --cutmix 0"
        )
    if cfg.global_batch_size % cfg.micro_batch_size:
        raise ValueError(
            f"global_batch_size={cfg.global_batch_size} is not a multiple of micro_batch_size={cfg.micro_batch_size}; "
            f"choose a global batch that is a multiple of micro_batch_size x data-parallel ranks"
        )
    if cfg.init_from is None and (cfg.init_from_ema or cfg.keep_classifier):
        flag = "init_from_ema" if cfg.init_from_ema else "keep_classifier"
        raise ValueError(
            f"{flag}=true needs init_from (a previous run directory or .safetensors file); set it, or drop {flag}"
        )
    from runtime.ds_config import resolve_ds_config_path

    resolve_ds_config_path(ds_config_name(cfg))
    check_directory_path("output_dir", cfg.output_dir)
    check_resume(cfg.resume)


def ds_config_name(cfg: TrainConfig) -> str:
    """The base DeepSpeed JSON: --ds_config, or ds_configs/zero<zero_stage>.json."""
    return cfg.ds_config or f"zero{cfg.zero_stage}"


def _check_augmentation(cfg: TrainConfig) -> None:
    """timm refuses a bad augmentation spec with a KeyError or an assert deep in the data set-up."""
    from timm.data import create_transform

    if cfg.auto_augment is not None:
        try:
            create_transform(32, is_training=True, auto_augment=cfg.auto_augment)
        except (AssertionError, ValueError, KeyError, IndexError) as err:
            raise ValueError(
                f"auto_augment={cfg.auto_augment!r} is not a timm augmentation spec ({err}); e.g. "
                f"'rand-m9-mstd0.5-inc1' (RandAugment), 'augmix-m5-w3', 'original', or none"
            ) from None
