"""The LLM training configuration: one dataclass, YAML presets in llm/configs/ that mirror it field for field,
`--key value` overrides (runtime.config reads all three), and the checks that know about language models: the token
budget, the data, the model, the paths.

Every number the run depends on lives here (batch sizes, LR schedule, precision, ZeRO stage...); the DeepSpeed JSON is
completed from it. RESUME_POLICY says, for every field, what a resume does when its value changed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm.data.corpus import CORPORA
from runtime.checks import MAX_SEED, FloatRange, check_directory_path, check_min_lr, check_resume
from runtime.config import ALLOW, IGNORE, REFUSE, ConfigEngine, opt
from runtime.fields import canonical

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# The flags that are model config keys of the MoE presets (the `mixture of experts` group below).
MOE_FLAGS = (
    "num_experts",
    "moe_projections",
    "top_k",
    "router_type",
    "router_input",
    "router_score",
    "router_gate",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "router_bias_update_rate",
)


@dataclass
class TrainConfig:
    model: str = opt(
        "llama-tiny", "preset name in llm/configs/, a config.json, or an HF model directory", section="model"
    )
    model_overrides: dict[str, Any] = opt(help='e.g. {"moe_projections": ["up_proj"]}', factory=dict)
    attn_implementation: str = opt("sdpa", "the attention kernel", choices=("sdpa", "flash_attention_2", "eager"))
    activation_checkpointing: bool = opt(False, "recompute activations in the backward pass: memory for compute")
    compile: bool = opt(False, "torch.compile the model")
    # The mixture-of-experts settings of ParameterNet and standard-MoE presets (llm/model/router.py's RouterConfig):
    # each is the model config key of the same name, folded into model_overrides (the two may not disagree); none
    # keeps the preset's value.
    num_experts: int | None = opt(None, "experts per MoE layer (none: the preset's)", section="mixture of experts")
    moe_projections: list[str] | None = opt(None, "the SwiGLU projections made MoE layers, e.g. up_proj")
    top_k: int | None = opt(None, "experts per token")
    router_type: str | None = opt(None, "learned, or hash (token id -> expert)", choices=(None, "learned", "hash"))
    router_input: str | None = opt(None, "what a learned router reads", choices=(None, "raw", "centered"))
    router_score: str | None = opt(None, "the router's scores", choices=(None, "softmax", "sigmoid"))
    router_gate: str | None = opt(
        None,
        "what multiplies the expert's output: its score, or normalized (1 for top-1)",
        choices=(None, "softmax", "normalized"),
    )
    router_aux_loss_coef: float | None = opt(None, "the Switch load-balancing loss's weight")
    router_z_loss_coef: float | None = opt(None, "the router z-loss's weight")
    router_bias_update_rate: float | None = opt(None, "aux-loss-free balancing's bias step (DeepSeek-V3: 0.001)")
    data_path: list[str] = opt(
        help="Megatron style: [PREFIX] or [W1, PREFIX1, W2, PREFIX2]; [] = the embedded corpus",
        factory=list,
        section="data",
    )
    corpus: str = opt("shakespeare", "the embedded corpus used when data_path is empty", choices=tuple(CORPORA))
    tokenizer: str | None = opt(None, "HF tokenizer directory; None with the embedded corpus = its tokenizer")
    split: str | None = opt(None, 'train,valid,test by documents, e.g. "969,30,1"; None = the corpus default')
    data_cache_dir: str | None = opt(None, "where index arrays are cached (default: next to the shards)")
    seq_len: int = opt(256, "tokens per sample")
    document_mask: bool = opt(
        False,
        "each token of a packed sample attends only within its document (split at EOS), positions restart per "
        "document; off = attention across the whole sample (the paper's)",
    )
    micro_batch_size: int = opt(8, "samples per rank and forward pass")
    global_batch_size: int = opt(16, "samples per optimizer step = micro_batch_size x ranks x gradient accumulation")
    train_iters: int | None = opt(None, "optimizer steps; or train_tokens")
    train_tokens: int | None = opt(None, "a token budget instead of train_iters")
    lr: float = opt(1e-3, "peak learning rate (AdamW)", section="optimizer and schedule")
    min_lr: float = opt(1e-4, "the floor of the decay, in [0, lr]")
    warmup_iters: int = opt(10, "linear warmup steps")
    lr_decay_style: str = opt(
        "cosine",
        "after the warmup; wsd: stable at lr, then a linear decay",
        choices=("cosine", "linear", "constant", "wsd"),
    )
    lr_decay_iters: int | None = opt(None, "default: train_iters")
    wsd_decay_fraction: float = opt(0.2, "wsd: the final fraction of lr_decay_iters (or train_iters) spent decaying")
    weight_decay: float = opt(0.1, "not applied to norms and biases")
    adam_beta1: float = opt(0.9, "AdamW's beta1")
    adam_beta2: float = opt(0.95, "AdamW's beta2")
    adam_eps: float = opt(1e-8, "AdamW's epsilon")
    grad_clip: float = opt(1.0, "max global gradient norm (0 = off)")
    precision: str = opt("fp32", "the compute precision", choices=("fp32", "bf16", "fp16"), section="engine")
    zero_stage: int = opt(1, "the ZeRO stage: what is sharded over the ranks", choices=(0, 1, 2, 3))
    ds_config: str | None = opt(
        None, "ds_configs/<name>.json, its name or a path; None = ds_configs/zero<zero_stage>.json"
    )
    expert_parallel_size: int = opt(1, "ranks that share one copy of the experts (1 = no expert parallelism)")
    eval_interval: int = opt(50, "steps between validations", section="evaluation, checkpoints, logging")
    eval_iters: int = opt(4, "validation batches per evaluation (0 = none)")
    eval_points: int = opt(0, "> 0: validate at this many log-spaced iterations from eval_interval to the end instead")
    eval_tasks: str | None = opt(
        None,
        "zero-shot lm-eval tasks run on the live model at every validation, e.g. arc_easy,piqa or llama (offline "
        "twins without hub access); accuracies in metrics.jsonl and TensorBoard as zero_shot/<task>",
    )
    eval_limit: int = opt(20, "documents per task of eval_tasks at each validation")
    save_interval: int = opt(100, "steps between checkpoints")
    keep_last: int = opt(2, "checkpoints kept")
    log_interval: int = opt(10, "steps between metrics records")
    seed: int = opt(1234, "weights, sample order and dropout are functions of it")
    output_dir: str = opt("runs/default", "the run directory: config, metrics, checkpoints, the exported model")
    resume: str = opt("none", "none | auto | <checkpoint directory>")
    max_nonfinite_steps: int = opt(5, "consecutive skipped non-finite steps before the run stops")
    export: bool = opt(True, "export a Hugging Face directory (with tokenizer) to <output_dir>/hf at the end")
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

    def resolved_train_iters(self) -> int:
        if self.train_iters is not None:
            return self.train_iters
        assert self.train_tokens is not None
        return math.ceil(self.train_tokens / (self.global_batch_size * self.seq_len))

    def validation_iterations(self) -> frozenset[int]:
        """The iterations after which the run validates (the last one always does).

        Every eval_interval steps, or with eval_points > 0 that many iterations spaced evenly in log(iteration) from
        eval_interval to the last one, so that one run's curve covers every scale of a token-scaling study."""
        last = self.resolved_train_iters()
        if self.eval_points == 0:
            return frozenset(range(self.eval_interval, last + 1, self.eval_interval)) | {last}
        first = min(self.eval_interval, last)
        if self.eval_points == 1 or first == last:
            return frozenset({last})
        ratio = (last / first) ** (1 / (self.eval_points - 1))
        return frozenset(round(first * ratio**i) for i in range(self.eval_points)) | {last}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The smallest valid value of each integer field (None, where allowed, means "not set"), and what the edge means.
INT_MINIMUMS = {
    "num_experts": (1, ""),
    "top_k": (1, ""),
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
    "eval_points": (0, " (0 = every eval_interval)"),
    "eval_limit": (1, ""),
    "save_interval": (1, ""),
    "keep_last": (1, ""),
    "log_interval": (1, ""),
    "seed": (0, ""),
    "max_nonfinite_steps": (1, ""),
}
INT_MAXIMUMS = {"seed": (MAX_SEED, f"2**32 - 1 = {MAX_SEED}")}
# Each float field's valid range and the fix that goes with it (min_lr: within [0, lr], checked after lr).
FLOAT_RANGES = {
    "lr": FloatRange(0.0, False, math.inf, False, "the peak learning rate, e.g. 3e-4"),
    "weight_decay": FloatRange(0.0, True, math.inf, False, "0 turns it off; 0.1 is usual"),
    "adam_beta1": FloatRange(0.0, True, 1.0, False, "e.g. 0.9"),
    "adam_beta2": FloatRange(0.0, True, 1.0, False, "e.g. 0.95"),
    "adam_eps": FloatRange(0.0, False, math.inf, False, "e.g. 1e-8"),
    "grad_clip": FloatRange(0.0, True, math.inf, False, "the max global gradient norm; 0 turns clipping off"),
    "wsd_decay_fraction": FloatRange(0.0, False, 1.0, True, "the share of the run that decays, e.g. 0.2"),
    "router_aux_loss_coef": FloatRange(0.0, True, math.inf, False, "0 turns it off; Switch used 0.01 per layer"),
    "router_z_loss_coef": FloatRange(0.0, True, math.inf, False, "0 turns it off; ST-MoE used 0.001"),
    "router_bias_update_rate": FloatRange(0.0, True, math.inf, False, "0 turns it off; DeepSeek-V3 used 0.001"),
}
EXAMPLES = {
    "train_iters": "1000",
    "train_tokens": "2000000000",
    "lr_decay_iters": "1000",
    "model_overrides": "'{\"num_experts\": 4}'",
    "data_path": "shards/corpus_text_document",
    "tokenizer": "tokenizers/mine",
    "split": "969,30,1",
    "data_cache_dir": "cache",
    "ds_config": "zero1",
}
ENGINE: ConfigEngine[TrainConfig] = ConfigEngine(
    TrainConfig,
    preset_dir=CONFIG_DIR,
    int_minimums=INT_MINIMUMS,
    int_maximums=INT_MAXIMUMS,
    float_ranges=FLOAT_RANGES,
    examples=EXAMPLES,
)
FIELDS = ENGINE.fields

# How a resume treats each field whose value differs from the config saved with the checkpoint (runtime.checkpoint).
#   REFUSE: the checkpoint means something else under the new value: its weights, optimizer state or position in the
#           data would be read wrongly (this is what Megatron's check_checkpoint_args and its LR-scheduler checks
#           guard, widened to the data: here the sample order is a pure function of the settings).
#   ALLOW:  a change made on purpose: how long, how often, how fast, the tail of the LR schedule; logged as
#           "resume: log_interval 10 -> 5".
#   IGNORE: where the run is and how it was started, not what it is.
# tests/test_resume_safety.py fails when a TrainConfig field is missing here, so every new field gets a decision.
_ARCH = "the architecture of the saved weights"
_DATA = "the position in the data that the checkpoint holds"
_OPT = "the saved optimizer state was accumulated under it"
_HEAD = "the LR schedule already followed (the LR would jump; Megatron refuses this too)"
RESUME_POLICY: dict[str, tuple[str, str]] = {
    "model": (REFUSE, _ARCH),
    "model_overrides": (REFUSE, _ARCH),
    **{name: (REFUSE, "a model config key (folded into model_overrides)") for name in MOE_FLAGS},
    "attn_implementation": (ALLOW, "the same attention, another kernel"),
    "activation_checkpointing": (ALLOW, "memory for compute; the same math"),
    "compile": (ALLOW, "speed only"),
    "data_path": (REFUSE, _DATA),
    "corpus": (REFUSE, _DATA),
    "tokenizer": (REFUSE, "the token ids the weights were trained on"),
    "split": (REFUSE, _DATA),
    "data_cache_dir": (ALLOW, "where index arrays are cached"),
    "seq_len": (REFUSE, _DATA),
    # Nothing saved is read differently under it (weights, optimizer state, sample order): what changes is what each
    # new step's tokens attend to, a change of regime made on purpose (e.g. a switch to document masking later in a
    # run), logged like grad_clip's.
    "document_mask": (ALLOW, "what each new step's tokens attend to; the weights, optimizer state and data read alike"),
    "micro_batch_size": (ALLOW, "gradient accumulation changes, the global batches stay the same"),
    "global_batch_size": (REFUSE, _DATA),
    "train_iters": (ALLOW, "extending or shortening the run"),
    "train_tokens": (ALLOW, "extending or shortening the run"),
    "lr": (REFUSE, _HEAD),
    "min_lr": (ALLOW, "the tail of the LR schedule"),
    "warmup_iters": (REFUSE, _HEAD),
    "lr_decay_style": (REFUSE, _HEAD),
    "lr_decay_iters": (ALLOW, "the tail of the LR schedule"),
    "wsd_decay_fraction": (ALLOW, "the tail of the LR schedule (wsd: where the stable phase ends)"),
    "weight_decay": (REFUSE, _OPT),
    "adam_beta1": (REFUSE, _OPT),
    "adam_beta2": (REFUSE, _OPT),
    "adam_eps": (REFUSE, _OPT),
    "grad_clip": (ALLOW, "a stabiliser applied to each new step"),
    "precision": (REFUSE, "the layout of the optimizer state (fp32 master weights under bf16/fp16)"),
    # Between ZeRO-1 and ZeRO-2, with the world size and expert_parallel_size, the trainer reshards the saved state
    # (runtime.reshard; resume_differences' reshards=True): refused only where that cannot be done.
    "zero_stage": (REFUSE, "the layout of the optimizer state (sharded by ZeRO stage)"),
    "ds_config": (ALLOW, "engine settings; the ZeRO stage and precision it must agree with are checked"),
    "expert_parallel_size": (REFUSE, "how the experts and their optimizer state are sharded over the ranks"),
    "eval_interval": (ALLOW, "how often"),
    "eval_iters": (ALLOW, "how much validation"),
    "eval_points": (ALLOW, "how often"),
    "eval_tasks": (ALLOW, "what is measured"),
    "eval_limit": (ALLOW, "how much is measured"),
    "save_interval": (ALLOW, "how often"),
    "keep_last": (ALLOW, "how many checkpoints stay"),
    "log_interval": (ALLOW, "how often"),
    "seed": (REFUSE, _DATA),
    "output_dir": (IGNORE, "where the run is (a run may be moved)"),
    "resume": (IGNORE, "how this run was started"),
    "max_nonfinite_steps": (ALLOW, "a safety limit"),
    "export": (ALLOW, "what happens at the end"),
    "progress_bar": (ALLOW, "display only"),
    "tensorboard": (ALLOW, "display only"),
    "wandb_project": (ALLOW, "where the metrics also go"),
    "wandb_entity": (ALLOW, "where the metrics also go"),
    "wandb_run_name": (ALLOW, "display only"),
    "wandb_tags": (ALLOW, "display only"),
}


def type_of(name: str) -> Any:
    return ENGINE.hints[name]


def _apply(config: TrainConfig, updates: dict[str, Any], source: str, from_cli: bool) -> None:
    # The budget is train_iters OR train_tokens: a layer that gives one replaces the other given by a layer below
    # (`--train_tokens 2e9` over a preset with train_iters); one layer giving both is still refused by validate().
    names = {canonical(key) for key in updates}
    for given, other in (("train_iters", "train_tokens"), ("train_tokens", "train_iters")):
        if given in names and other not in names:
            setattr(config, other, None)
    ENGINE.apply(config, updates, source, from_cli)


def _check_numbers(config: TrainConfig) -> None:
    ENGINE.check_ranges(config)
    check_min_lr(config.lr, config.min_lr)


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


def _check_paths(config: TrainConfig) -> None:
    check_directory_path("output_dir", config.output_dir)
    if config.data_cache_dir is not None:
        check_directory_path("data_cache_dir", config.data_cache_dir)
    check_resume(config.resume)
    if config.tokenizer is not None and not (Path(config.tokenizer) / "tokenizer.json").is_file():
        raise ValueError(
            f"tokenizer={config.tokenizer!r}: no tokenizer.json there; pass an HF tokenizer directory (train one with "
            f"python -m llm.data.tokenizer train --input FILES --vocab-size N --out DIR)"
        )
    if config.ds_config is not None:
        from runtime.ds_config import resolve_ds_config_path

        resolve_ds_config_path(config.ds_config)


def _check_data(config: TrainConfig) -> None:
    from llm.data.data_path import normalize_weights, parse_data_path, parse_split

    if config.data_path:
        try:
            prefixes, weights = parse_data_path(config.data_path)
            normalize_weights(weights, prefixes)
        except ValueError as err:
            raise ValueError(f"data_path: {err}") from None
    if config.split is not None and parse_split(config.split)[0] == 0:
        raise ValueError(
            f"split={config.split!r} leaves no documents for training; give the train part a positive "
            f"weight, e.g. '969,30,1'"
        )


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
            raise ValueError(
                f"expert_parallel_size={ep} needs a ParameterNet model (with MoE projections), but "
                f"model={config.model!r} has no experts; use a parameternet-llama-* model or 1"
            )
        if num_experts % ep:
            raise ValueError(
                f"expert_parallel_size={ep} does not divide num_experts={num_experts}; choose a divisor "
                f"of {num_experts}"
            )
    if config.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the flash-attn package, which is not "
            "installed (pip install -e '.[gpu]' on a CUDA machine); use sdpa (flash kernels on CUDA too)"
        )


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
        notes.append(
            f"warmup_iters={config.warmup_iters} > train_iters={iters}: the learning rate never reaches "
            f"lr={config.lr:g}; lower --warmup_iters to at most {iters}"
        )
    return notes


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, cli_overrides: list[str] | None = None
) -> TrainConfig:
    """Defaults <- YAML file (a preset name in llm/configs/ or a path) <- `overrides` <- `--key value` pairs."""
    config = ENGINE.load(path, overrides, cli_overrides, apply=_apply)
    fold_moe_flags(config)
    validate(config)
    return config


def fold_moe_flags(config: TrainConfig) -> None:
    """The MoE flags given (not none) into model_overrides, where the model is built from; a key given both ways must
    agree."""
    if not isinstance(config.model_overrides, dict):
        return  # validate() names it
    for name in MOE_FLAGS:
        value = getattr(config, name)
        if value is None:
            continue
        if name in config.model_overrides and config.model_overrides[name] != value:
            raise ValueError(
                f"{name}={value!r} and model_overrides {{{name!r}: {config.model_overrides[name]!r}}} disagree; "
                f"give it once, as --{name}"
            )
        config.model_overrides = {**config.model_overrides, name: value}


def dump_yaml(config: TrainConfig) -> str:
    return ENGINE.dump_yaml(config)
