"""How a resume treats each LLM TrainConfig field that differs from the checkpoint's (runtime.checkpoint applies it).

tests/test_resume_safety.py fails when a TrainConfig field is missing here, so every new field gets a decision.
"""

from __future__ import annotations

from runtime.checkpoint import ALLOW, IGNORE, REFUSE, ResumePolicy

_ARCH = "the architecture of the saved weights"
_DATA = "the position in the data that the checkpoint holds"
_OPT = "the saved optimizer state was accumulated under it"
_HEAD = "the LR schedule already followed (the LR would jump; Megatron refuses this too)"
RESUME_POLICY: ResumePolicy = {
    "model": (REFUSE, _ARCH),
    "model_overrides": (REFUSE, _ARCH),
    "attn_implementation": (ALLOW, "the same attention, another kernel"),
    "activation_checkpointing": (ALLOW, "memory for compute; the same math"),
    "compile": (ALLOW, "speed only"),
    "data_path": (REFUSE, _DATA),
    "tokenizer": (REFUSE, "the token ids the weights were trained on"),
    "split": (REFUSE, _DATA),
    "data_cache_dir": (ALLOW, "where index arrays are cached"),
    "seq_len": (REFUSE, _DATA),
    "micro_batch_size": (ALLOW, "gradient accumulation changes, the global batches stay the same"),
    "global_batch_size": (REFUSE, _DATA),
    "train_iters": (ALLOW, "extending or shortening the run"),
    "train_tokens": (ALLOW, "extending or shortening the run"),
    "lr": (REFUSE, _HEAD),
    "min_lr": (ALLOW, "the tail of the LR schedule"),
    "warmup_iters": (REFUSE, _HEAD),
    "lr_decay_style": (REFUSE, _HEAD),
    "lr_decay_iters": (ALLOW, "the tail of the LR schedule"),
    "weight_decay": (REFUSE, _OPT),
    "adam_beta1": (REFUSE, _OPT),
    "adam_beta2": (REFUSE, _OPT),
    "adam_eps": (REFUSE, _OPT),
    "grad_clip": (ALLOW, "a stabiliser applied to each new step"),
    "precision": (REFUSE, "the layout of the optimizer state (fp32 master weights under bf16/fp16)"),
    "zero_stage": (REFUSE, "the layout of the optimizer state (sharded by ZeRO stage)"),
    "ds_config": (ALLOW, "engine settings; the ZeRO stage and precision it must agree with are checked"),
    "expert_parallel_size": (REFUSE, "how the experts and their optimizer state are sharded over the ranks"),
    "eval_interval": (ALLOW, "how often"),
    "eval_iters": (ALLOW, "how much validation"),
    "save_interval": (ALLOW, "how often"),
    "keep_last": (ALLOW, "how many checkpoints stay"),
    "log_interval": (ALLOW, "how often"),
    "seed": (REFUSE, _DATA),
    "output_dir": (IGNORE, "where the run is (a run may be moved)"),
    "resume": (IGNORE, "how this run was started"),
    "max_nonfinite_steps": (ALLOW, "a safety limit"),
    "export": (ALLOW, "what happens at the end"),
    "progress_bar": (ALLOW, "display only"),
    "tensorboard": (ALLOW, "where metrics are also written"),
}
