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
    from runtime.errors import trainer_main

    def body(cfg) -> None:
        from llm.train.trainer import Trainer

        trainer = Trainer(cfg)
        result = trainer.train()
        if trainer.rank == 0:
            print(f"done: {result}")

    return trainer_main(ENGINE, load_config, __doc__ or "", body, argv, warnings_for)


if __name__ == "__main__":
    sys.exit(main())
