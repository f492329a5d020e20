"""Parameters and multiply-adds of every registered ParameterNet and static twin.

    python -m vision.summary                       # all models at 224x224
    python -m vision.summary --img-size 32 --json  # machine-readable
    python -m vision.summary --models parameternet_600m ghostnet_100   # any timm model name

Multiply-adds are counted on one forward pass with `torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2), which
includes what dynamic convolutions add: routing (GAP + Linear) and the per-sample kernel mixing matmul. Only the
forward is counted: torch's backward formula for grouped convolutions ignores `groups`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from vision.models import MODEL_NAMES, check_input_size


@dataclass(frozen=True)
class ModelCost:
    model: str
    params: int
    macs: int
    img_size: int

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, img_size: int, in_chans: int = 3) -> int:
    """Multiply-adds of one image's forward pass (batch 1, eval mode)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_chans, img_size, img_size))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def model_cost(name: str, img_size: int = 224, num_classes: int = 1000) -> ModelCost:
    if name not in timm.list_models():
        raise ValueError(f"model {name!r} is not registered in timm; ours: {', '.join(MODEL_NAMES)}")
    if name in MODEL_NAMES:
        check_input_size(img_size, name)
    model = timm.create_model(name, num_classes=num_classes)
    return ModelCost(name, count_params(model), count_macs(model, img_size), img_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vision.summary", description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=224, help="square input resolution (default 224)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier width (default 1000)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), help="timm model names (default: ours)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per model instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        costs = [model_cost(name, args.img_size, args.num_classes) for name in args.models]
    except ValueError as err:
        print(f"vision.summary: {err}", file=sys.stderr)
        return 2
    if args.json:
        for cost in costs:
            print(json.dumps(asdict(cost)))
        return 0
    print(f"{'model':<20} {'params (M)':>11} {'GMACs @' + str(args.img_size):>12}")
    for cost in costs:
        print(f"{cost.model:<20} {cost.params_m:>11.2f} {cost.gmacs:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
