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


def usage() -> str:
    from llm.train.config import FIELDS, TrainConfig

    defaults = TrainConfig()
    keys = "\n".join(f"  --{name} (default: {getattr(defaults, name)!r})" for name in FIELDS)
    return f"{(__doc__ or '').strip()}\n\nTraining-config fields (llm/train/config.py):\n{keys}\n"


def main(argv: list[str] | None = None) -> int:
    from llm.train.config import first_rank_on_node, load_config, print_error, warnings_for

    argv = list(sys.argv[1:] if argv is None else argv)
    speaks = first_rank_on_node(argv)  # config errors and warnings: the same on every rank, printed once per node
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    config_path = None
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config" and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
                if speaks:
                    print_error("--config needs a value: a preset name (tiny, 1b) or a YAML file")
                return 2
            config_path = argv[i + 1] if arg == "--config" else arg.split("=", 1)[1]
            del argv[i:i + (2 if arg == "--config" else 1)]
            break
    try:
        cfg = load_config(config_path, cli_overrides=argv)
    except ValueError as err:
        if speaks:
            print_error(str(err))
        return 2
    if speaks:
        for note in warnings_for(cfg):
            print_error(note, kind="warning")

    import torch.distributed as dist

    from llm.train.trainer import Trainer, TrainingError

    try:
        trainer = Trainer(cfg)
        result = trainer.train()
    except (TrainingError, ValueError, FileNotFoundError) as err:
        print_error(str(err))  # every rank: these may differ between ranks
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
