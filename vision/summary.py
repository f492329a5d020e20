"""Parameters and multiply-adds of every registered ParameterNet and static twin.

    python -m vision.summary                       # all models at 224x224
    python -m vision.summary --img-size 32 --json  # machine-readable
    python -m vision.summary --models parameternet_600m ghostnet_100   # any timm model name
    python -m vision.summary --img-size 28 --in-chans 1 --num-classes 10 --breakdown   # where the MACs go

Multiply-adds are counted on one forward pass with `torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2), which
includes what dynamic convolutions add: routing (GAP + Linear) and the per-sample kernel mixing matmul. Only the
forward is counted: torch's backward formula for grouped convolutions ignores `groups`.

`--breakdown` splits the count by the counter's own per-module records: the convolutions of the dynamic convs, their
kernel mixing (E x kernel size per image), their routing Linear (in x E), and everything else (static convs, SE,
head). The mixing is the price of the extra parameters: E / (H x W) of a dynamic conv's cost at an H x W output.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from runtime.errors import print_error
from vision.models import MODEL_NAMES, DynamicConv, check_input_size


@dataclass(frozen=True)
class MacsBreakdown:
    """One image's multiply-adds by part; the parts add up to the total."""

    dynamic_conv: int  # the convolutions of DynamicConv layers (what the static twin's convs cost)
    mixing: int  # DynamicConv kernel mixing: [E] x [E, kernel] per image
    routing: int  # DynamicConv routing Linear(in, E)
    other: int  # static convs, squeeze-excite, head, classifier

    @property
    def total(self) -> int:
        return self.dynamic_conv + self.mixing + self.routing + self.other


@dataclass(frozen=True)
class ModelCost:
    model: str
    params: int
    macs: int
    img_size: int
    breakdown: MacsBreakdown | None = None

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _count(model: torch.nn.Module, img_size: int, in_chans: int) -> FlopCounterMode:
    """A flop counter that ran one image's forward pass (batch 1, eval mode)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_chans, img_size, img_size))
    finally:
        model.train(was_training)
    return counter


def count_macs(model: torch.nn.Module, img_size: int, in_chans: int = 3) -> int:
    """Multiply-adds of one image's forward pass (batch 1, eval mode)."""
    return _count(model, img_size, in_chans).get_total_flops() // 2


def macs_breakdown(model: torch.nn.Module, img_size: int, in_chans: int = 3) -> MacsBreakdown:
    """`count_macs` split into the parts of `MacsBreakdown`, read from the counter's per-module records."""
    counter = _count(model, img_size, in_chans)
    # The counter names a module by its path under the root module's class name ("ParameterNet.conv_stem.routing").
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    conv = mixing = routing = 0
    for name, module in model.named_modules():
        if not isinstance(module, DynamicConv):
            continue
        routing += sum(per_module.get(f"{root}.{name}.routing", {}).values()) // 2
        for op, flops in per_module.get(f"{root}.{name}.cond_conv", {}).items():
            if op is torch.ops.aten.convolution:
                conv += flops // 2
            else:  # the [B, E] x [E, kernel] matmul (and the bias mixing, when there is a bias)
                mixing += flops // 2
    total = counter.get_total_flops() // 2
    return MacsBreakdown(conv, mixing, routing, total - conv - mixing - routing)


def model_cost(
    name: str, img_size: int = 224, num_classes: int = 1000, in_chans: int = 3, breakdown: bool = False
) -> ModelCost:
    if name not in timm.list_models():
        raise ValueError(f"model {name!r} is not registered in timm; ours: {', '.join(MODEL_NAMES)}")
    if name in MODEL_NAMES:
        check_input_size(img_size, name)
    model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans)
    if breakdown:
        parts = macs_breakdown(model, img_size, in_chans)
        return ModelCost(name, count_params(model), parts.total, img_size, parts)
    return ModelCost(name, count_params(model), count_macs(model, img_size, in_chans), img_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vision.summary", description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=224, help="square input resolution (default 224)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier width (default 1000)")
    parser.add_argument("--in-chans", type=int, default=3, help="input channels (default 3; 1 for Fashion-MNIST)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), help="timm model names (default: ours)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per model instead of a table")
    parser.add_argument(
        "--breakdown", action="store_true", help="split the MACs: dynamic convs, their kernel mixing and routing, other"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        costs = [
            model_cost(name, args.img_size, args.num_classes, args.in_chans, args.breakdown) for name in args.models
        ]
    except ValueError as err:
        print_error(str(err), prog="vision.summary")
        return 2
    if args.json:
        for cost in costs:
            row = asdict(cost)
            if cost.breakdown is None:
                del row["breakdown"]
            print(json.dumps(row))
        return 0
    header = f"{'model':<20} {'params (M)':>11} {'GMACs @' + str(args.img_size):>12}"
    if args.breakdown:
        header += f" {'dyn conv':>9} {'mixing':>9} {'routing':>9} {'other':>9}   (MMACs)"
    print(header)
    for cost in costs:
        line = f"{cost.model:<20} {cost.params_m:>11.2f} {cost.gmacs:>12.3f}"
        if cost.breakdown is not None:
            b = cost.breakdown
            line += "".join(f" {part / 1e6:>9.3f}" for part in (b.dynamic_conv, b.mixing, b.routing, b.other))
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
