"""The comparison plots: per-task accuracy bars (LLM, error bars over seeds), zero-shot accuracy during training (LLM
runs with --eval_tasks), validation accuracy curves (vision) and loss curves (both; bands over seeds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from evals.runs import LLM, VISION, RunGroup  # noqa: E402
from evals.scores import AVERAGE, GroupScores, band  # noqa: E402
from runtime.fsutil import atomic_path  # noqa: E402


def save_figure(fig: Any, path: Path) -> None:
    """Write a PNG atomically (a reader never sees half a file) and close the figure."""
    try:
        with atomic_path(path) as tmp:  # the umask's mode, not mkstemp's 0600: teammates read the plots
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_accuracy(scores: list[GroupScores], tasks: list[str], path: Path) -> None:
    """Grouped bars per task (and the average); error bars: std over seeds, else lm-eval's stderr."""
    names = [*tasks, AVERAGE]
    width = 0.8 / len(scores)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.5))
    for i, s in enumerate(scores):
        xs = [j + (i - (len(scores) - 1) / 2) * width for j in range(len(names))]
        means = [100 * s.per_task[n].mean for n in names]
        errs = [
            100 * (s.per_task[n].std if s.per_task[n].std is not None else (s.per_task[n].sem or 0.0)) for n in names
        ]
        n_seeds = s.per_task[AVERAGE].n
        label = s.label + (f" ({n_seeds} seeds)" if n_seeds > 1 else "")
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_title("Zero-shot accuracy per task")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def fill_std(ax: Any, xs: list[float], ys: list[float], sd: list[float], color: str) -> None:
    """The band mean ± std (evals.scores.band's) around a curve."""
    ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], color=color, alpha=0.15)


# Where each task's curves run along: LLM runs by training tokens, vision runs by optimizer step.
X_AXIS = {LLM: ("tokens", "training tokens"), VISION: ("iteration", "training iterations")}


def _points(records: list[dict[str, Any]], x_key: str, y_key: str) -> dict[float, float]:
    return {float(r.get(x_key, r.get("iteration", 0))): float(r[y_key]) for r in records if r.get(y_key) is not None}


def plot_losses(groups: list[RunGroup], path: Path) -> None:
    """Training loss (thin) and validation loss (markers) against training tokens (LLM) or iterations (vision);
    bands: std over seeds."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x_key, x_label = X_AXIS[groups[0].task] if groups else X_AXIS[LLM]
    drew = False
    for i, group in enumerate(groups):
        color = colors[i % len(colors)]
        train = [_points(run.train, x_key, run.train_loss_key) for run in group.runs if run.train]
        valid = [_points(run.valid, x_key, "val_loss") for run in group.runs if run.valid]
        if train:
            xs, ys, sd = band(train)
            ax.plot(xs, ys, color=color, alpha=0.5, linewidth=1, label=f"{group.label} train")
            if len(train) > 1:
                fill_std(ax, xs, ys, sd, color)
            drew = True
        if valid:
            xs, ys, sd = band(valid)
            ax.errorbar(
                xs,
                ys,
                yerr=sd if len(valid) > 1 else None,
                color=color,
                marker="o",
                linewidth=2,
                capsize=3,
                label=f"{group.label} validation",
            )
            drew = True
    if not drew:
        ax.text(0.5, 0.5, "no metrics.jsonl in these runs", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(x_label)
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Loss curves")
    if drew:
        ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_val_accuracy(groups: list[RunGroup], path: Path) -> None:
    """Vision runs: validation top-1 (solid) and top-5 (dashed) accuracy against iterations; bands: std over seeds."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drew = False
    for i, group in enumerate(groups):
        color = colors[i % len(colors)]
        for key, style in (("top1", "-"), ("top5", "--")):
            curves = [_points(run.valid, "iteration", key) for run in group.runs]
            curves = [c for c in curves if c]
            if not curves:
                continue
            xs, ys, sd = band(curves)
            ax.plot(xs, ys, style, color=color, marker="o", linewidth=2, label=f"{group.label} {key}")
            if len(curves) > 1:
                fill_std(ax, xs, ys, sd, color)
            drew = True
    if not drew:
        ax.text(0.5, 0.5, "no validation records in these runs", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("training iterations")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Validation accuracy")
    if drew:
        ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


ZERO_SHOT_META = ("kind", "iteration", "tokens")


def plot_zero_shot(groups: list[RunGroup], path: Path) -> bool:
    """LLM runs trained with --eval_tasks: each task's zero-shot accuracy against training tokens, one panel per task,
    one line per group (band: std over seeds). Writes nothing and returns False when no run has such records."""
    tasks = sorted({k for g in groups for run in g.runs for r in run.zero_shot for k in r if k not in ZERO_SHOT_META})
    if not tasks:
        return False
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    from matplotlib.ticker import EngFormatter

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False, layout="constrained")
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, group in enumerate(groups):
            curves = [{x: 100 * y for x, y in _points(run.zero_shot, "tokens", task).items()} for run in group.runs]
            curves = [c for c in curves if c]
            if not curves:
                continue
            xs, ys, sd = band(curves)
            color = colors[i % len(colors)]
            ax.plot(xs, ys, color=color, marker="o", linewidth=2, label=group.label)
            if len(curves) > 1:
                fill_std(ax, xs, ys, sd, color)
        ax.set_title(task)
        ax.set_xlabel("training tokens")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("zero-shot accuracy (%)")
    axes[0][0].legend()
    fig.suptitle("Zero-shot accuracy during training (--eval_tasks; bands: std over seeds)")
    save_figure(fig, path)
    return True
