"""Experiments: named sets of arms trained and evaluated over several seeds (launch/experiment.sh), and their report.

    python -m evals.experiment arms paper-llm [--size small] [--arms vanilla,pn-down-e8]   the arms, as compare.sh
                                                                                          --run specifications
    python -m evals.experiment arms paper-vision                                            NAME --model M
                                                                                          [--num_experts N] lines
    python -m evals.experiment arms canonical-moe --size micro --seeds 5                   5 NAME KIND ... lines
    python -m evals.experiment report OUT [--experiment paper-llm] [--arms ...]            OUT/report.md, loss.png,
                                                                                          accuracy.png, report.json

The arms are in evals.experiment.arms; the reports in evals.experiment.report (LLM), .scaling (token scaling) and
.vision; `python -m` runs this module's main (__main__.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evals.experiment.arms import (
    EXPERIMENTS,
    SCALING_EXPERIMENTS,
    VISION_EXPERIMENTS,
    select_arms,
    select_vision_arms,
)
from runtime.errors import print_error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals.experiment", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    arms = sub.add_parser("arms", help="print the arms as launch/compare.sh --run specifications, one a line")
    arms.add_argument("experiment", help=f"one of {', '.join([*EXPERIMENTS, *VISION_EXPERIMENTS])}")
    arms.add_argument("--size", default="small", help="the presets' size: tiny, small, 1b (default small)")
    arms.add_argument("--arms", default=None, help="comma-separated arm names (default: all)")
    arms.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="prefix each line with the number of seeds to train it with: this, or fewer for a diagnostic arm",
    )
    report = sub.add_parser("report", help="write OUT/report.md, loss.png, accuracy.png and report.json")
    report.add_argument("out", type=Path, help="the experiment directory: OUT/<arm>/seed<N>/ run directories")
    report.add_argument("--experiment", default="paper-llm", help="whose arm descriptions and order to use")
    report.add_argument("--arms", default=None, help="comma-separated arm names (default: every arm under OUT)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "arms" and args.experiment in VISION_EXPERIMENTS:
            for vision_arm in select_vision_arms(args.experiment, args.arms):
                print(vision_arm.train_args())
            return 0
        if args.command == "arms":
            for arm in select_arms(args.experiment, args.size, args.arms):
                if args.seeds is None:
                    print(arm.run_spec(args.size))
                else:
                    print(min(args.seeds, arm.max_seeds or args.seeds), arm.run_spec(args.size))
            return 0
        if args.experiment in SCALING_EXPERIMENTS:
            from evals.experiment.scaling import write_scaling_report

            path = write_scaling_report(args.out, args.experiment, args.arms)
        elif args.experiment in VISION_EXPERIMENTS:
            from evals.experiment.vision import write_vision_report

            path = write_vision_report(args.out, args.experiment)
        else:
            from evals.experiment.report import write_report

            path = write_report(args.out, args.experiment, args.arms)
    except (ValueError, FileNotFoundError) as exc:
        print_error(str(exc))
        return 2
    print(path.read_text(encoding="utf-8"))
    plots = sorted(p.name for p in path.parent.glob("*.png"))
    print(f"report: {path} (plots: {', '.join(str(path.parent / p) for p in plots)})")
    return 0
