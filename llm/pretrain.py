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
    from llm.train.config import ENGINE

    return ENGINE.usage(__doc__ or "")


def main(argv: list[str] | None = None) -> int:
    from llm.train.config import ENGINE, load_config, warnings_for
    from runtime.errors import first_rank_on_node, print_error

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, code = ENGINE.parse_command_line(
        argv, lambda path, pairs: load_config(path, cli_overrides=pairs), __doc__ or ""
    )
    if cfg is None:
        return code
    if first_rank_on_node(argv):  # warnings: the same on every rank, printed once per node
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
