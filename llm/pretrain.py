"""Pretrain LLaMA or ParameterNet-LLaMA on the DeepSpeed engine.

    deepspeed --num_gpus N llm/pretrain.py [--config PRESET_OR_YAML] [--key value ...]
    python -m llm.pretrain --config tiny --train_iters 20            (one rank, no launcher)

Every field of llm.train.config.TrainConfig is a `--key value` override; the YAML presets in llm/configs/ mirror them.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    from llm.train.config import load_config, parse_cli_pairs

    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    argv = [a for i, a in enumerate(argv) if not a.startswith("--local_rank")]
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            print("error: --config needs a value", file=sys.stderr)
            return 2
        config_path = argv[i + 1]
        del argv[i:i + 2]
    try:
        parse_cli_pairs(argv)
        cfg = load_config(config_path, cli_overrides=argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import torch.distributed as dist

    from llm.train.trainer import Trainer, TrainingError

    try:
        trainer = Trainer(cfg)
        result = trainer.train()
    except (TrainingError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    else:
        if trainer.rank == 0:
            print(f"done: {result}")
        code = 0
    # The launch script repeats its stop request until the ranks exit; Python restores the default (fatal) action for
    # handled signals while it shuts down, so stop listening before then.
    import signal

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
