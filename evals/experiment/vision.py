"""The report of the vision experiment (`bash launch/experiment.sh paper-vision`): OUT/report.md, report.json,
accuracy.png and loss.png from the run directories OUT/<arm>/seed<N>/ that vision.train wrote.

evals.vision_report gives the per-arm tables (top-1/top-5 mean ± std over seeds, parameters, MACs and their ratio to
the static twin, images/s) and the plots; this module adds what an experiment needs on top: the paired difference of
each arm's top-1 to the static twin's, seed by seed (same seed = same initialisation stream and data order), with its
95% t interval, and a reading generated from those numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from evals.experiment.arms import VISION_BASELINE, VISION_EXPERIMENTS, VisionArm
from evals.experiment.report import report_path
from evals.experiment.stats import CONFIDENCE, PairedDifference, interval_text, p_text, paired_difference
from evals.runs import RunGroup, is_run_dir, load_run
from evals.vision_report import build_vision_report
from runtime.fsutil import write_text_atomic
from runtime.rundir import run_state

HEADER = "# ParameterNet vision experiment"  # the first line of every report.md this module writes

MACS_PREMISE = 1.10  # the paper's premise: the free parameters cost at most ~10% more multiply-adds


def _top1_by_seed(group: RunGroup) -> dict[int, float]:
    return {
        run.seed: float(run.summary["top1"]) for run in group.runs if run.seed is not None and "top1" in run.summary
    }


def load_arms(out: Path, experiment: str) -> tuple[list[tuple[VisionArm, RunGroup]], list[str]]:
    """The arms with finished runs, the static twin first, and the runs left out (unfinished), with why."""
    if experiment not in VISION_EXPERIMENTS:
        raise ValueError(
            f"--experiment {experiment!r} is not a vision experiment; known: {', '.join(VISION_EXPERIMENTS)}"
        )
    arms: list[tuple[VisionArm, RunGroup]] = []
    left_out: list[str] = []
    for arm in VISION_EXPERIMENTS[experiment]:
        if not (out / arm.name).is_dir():
            continue
        finished = []
        # Run by run, not load_group: an interrupted run (no summary.json, maybe no record yet) is left out, listed.
        for path in sorted(p for p in (out / arm.name).iterdir() if is_run_dir(p)):
            run = load_run(path)
            finished_run = run_state(path).finished
            if finished_run and run.task == "vision" and run.summary.get("top1") is not None and run.seed is not None:
                finished.append(run)
            else:
                state = run_state(path)
                why = state.describe() if not state.finished else "no summary.json with top1 and seed"
                left_out.append(f"`{path.relative_to(out)}`: {why}")
        if finished:
            arms.append((arm, RunGroup(arm.name, out / arm.name, finished)))
    if not arms or arms[0][0].name != VISION_BASELINE:
        raise ValueError(f"{out}: no finished {VISION_BASELINE!r} run (OUT/{VISION_BASELINE}/seed<N>/): the baseline")
    if len(arms) < 2:
        raise ValueError(f"{out}: no finished run besides {VISION_BASELINE}'s; {'; '.join(left_out)}")
    return arms, left_out


def paired_table(arms: list[tuple[VisionArm, RunGroup]], diffs: list[PairedDifference | None]) -> str:
    base = arms[0][1]
    lines = [
        f"| Arm | What | Seeds | MACs vs {VISION_BASELINE} | Δ top-1 vs {VISION_BASELINE} (paired, points) "
        f"[{100 * CONFIDENCE:.0f}% t interval] | p |",
        "|---|---|---|---:|---:|---:|",
    ]
    base_macs = float(base.runs[0].summary["macs"])
    for (arm, group), diff in zip(arms, diffs):
        seeds = ", ".join(str(r.seed) for r in sorted(group.runs, key=lambda r: r.seed or 0))
        macs = f"{float(group.runs[0].summary['macs']) / base_macs:.3f}x"
        cells = ["(baseline)", ""] if diff is None else [interval_text(diff, 1.0, 2), p_text(diff)]
        lines.append(f"| {arm.name} | {arm.what} | {seeds} | {macs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reading(arms: list[tuple[VisionArm, RunGroup]], diffs: list[PairedDifference | None]) -> str:
    base_macs = float(arms[0][1].runs[0].summary["macs"])
    base_params = float(arms[0][1].runs[0].summary["total_params"])
    sentences = []
    for (arm, group), diff in zip(arms[1:], diffs[1:]):
        assert diff is not None
        summary = group.runs[0].summary
        macs, params = float(summary["macs"]) / base_macs, float(summary["total_params"]) / base_params
        text = f"{arm.name}: {interval_text(diff, 1.0, 2)} top-1 points over {diff.n} paired seeds"
        if diff.n < 2:
            text += " (one seed: no interval)"
        elif diff.excludes_zero:
            text += f", p = {p_text(diff)}: the interval excludes 0"
        else:
            text += f", p = {p_text(diff)}: the interval includes 0, not significant at the 5% level"
        text += f"; {params:.2f}x the parameters at {macs:.3f}x the multiply-adds"
        if macs > MACS_PREMISE:
            text += f" (over the paper's premise of <= {MACS_PREMISE:.2f}x)"
        sentences.append(text + ".")
    return " ".join([_budget(arms[0][1]), *sentences, *_verdict(arms, diffs)])


def _budget(group: RunGroup) -> str:
    """What one run saw, from its summary.json and config.yaml: short runs are a caveat on every number below."""
    run = group.runs[0]
    iterations, epochs = run.summary.get("iterations"), run.summary.get("epochs")
    batch = run.config.get("global_batch_size")
    images = f" of {batch} images" if isinstance(batch, int) else ""
    return (
        f"Every run trained {iterations} iterations{images} ({epochs:g} epoch{'s' * (epochs != 1)}) and was "
        f"validated on {run.valid[-1].get('images', 'all') if run.valid else 'all'} images."
        if isinstance(epochs, (int, float))
        else ""
    )


def _verdict(arms: list[tuple[VisionArm, RunGroup]], diffs: list[PairedDifference | None]) -> list[str]:
    """Which arms separate from the twin, and whether top-1 follows the number of experts."""
    paired = [(arm, diff) for (arm, _), diff in zip(arms[1:], diffs[1:]) if diff is not None and diff.n >= 2]
    if not paired:
        return []
    better = [arm.name for arm, diff in paired if diff.excludes_zero and diff.mean > 0]
    worse = [arm.name for arm, diff in paired if diff.excludes_zero and diff.mean < 0]
    if not better and not worse:
        out = [f"No ParameterNet arm separates from the static twin at the 5% level ({len(paired)} compared)."]
    else:
        out = [f"Above the twin at the 5% level: {', '.join(better) or 'none'}; below: {', '.join(worse) or 'none'}."]
    by_experts = sorted((arm.num_experts, diff.mean) for arm, diff in paired if arm.num_experts is not None)
    if len(by_experts) >= 3:
        means = [mean for _, mean in by_experts]
        trend = (
            "rises"
            if all(b > a for a, b in zip(means, means[1:]))
            else "falls"
            if all(b < a for a, b in zip(means, means[1:]))
            else "is not monotone"
        )
        listing = ", ".join(f"{e} expert{'s' * (e > 1)} {m:+.2f}" for e, m in by_experts)
        out.append(f"The mean paired difference {trend} with the number of experts ({listing} points).")
    return out


def write_vision_report(out: Path, experiment: str = "paper-vision") -> Path:
    """Writes OUT/report.md, report.json, accuracy.png and loss.png; returns the report's path."""
    out = Path(out)
    path = report_path(out, HEADER)
    arms, left_out = load_arms(out, experiment)
    groups = [group for _, group in arms]
    body, _, data = build_vision_report(groups, out)
    base = _top1_by_seed(groups[0])
    diffs: list[PairedDifference | None] = [None, *[paired_difference(base, _top1_by_seed(g)) for g in groups[1:]]]
    parts = [
        f"{HEADER}: `{out}`",
        "",
        "## Reading",
        "",
        reading(arms, diffs)
        + (f" Not counted anywhere in this report ({len(left_out)}): " + "; ".join(left_out) + "." if left_out else ""),
        "",
        "## Top-1, paired by seed",
        "",
        f"Δ: the paired difference arm − {VISION_BASELINE} per seed, its mean and the {100 * CONFIDENCE:.0f}% Student "
        "t interval over the seeds both arms have; p is the two-sided paired t-test. Uncorrected for the number of "
        "arms.",
        "",
        paired_table(arms, diffs),
        body.split("\n", 1)[1],  # evals.vision_report's tables and plots, without its title
    ]
    if left_out:
        parts += ["Left out (not counted anywhere above):", "", *[f"- {why}" for why in left_out], ""]
    data["experiment"] = experiment
    data["paired_top1"] = {arm.name: None if diff is None else asdict(diff) for (arm, _), diff in zip(arms, diffs)}
    write_text_atomic(out / "report.json", json.dumps(data, indent=2, default=_jsonable) + "\n")
    write_text_atomic(path, "\n".join(parts))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON: {type(value).__name__}")
