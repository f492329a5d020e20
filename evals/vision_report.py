"""The side-by-side report of vision runs (vision.train): validation top-1 / top-5, loss, parameters, MACs, speed.

evals.compare calls build_vision_report when every run it is given is a vision run (summary.json "task": "vision").
Accuracies stay in percent, as the trainer writes them; cells are mean ± std over the seeds of a group; the first group
is the baseline, and every other one gets a delta with the standard error of the difference (over seeds, or, for one
seed, the binomial error of the finite validation set).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from evals.runs import Run, RunGroup
from evals.scores import Stat, delta, delta_text, human, stat_text
from runtime.rundir import SUMMARY_KEYS

# summary.json keys the report computes with (runtime.rundir.SUMMARY_KEYS plus the vision trainer's own).
REQUIRED = (*SUMMARY_KEYS, "macs", "epochs", "top1", "top5")
ACCURACIES = {"top1": "Top-1", "top5": "Top-5", "ema_top1": "EMA top-1", "ema_top5": "EMA top-5"}


def check_vision_runs(groups: list[RunGroup]) -> None:
    """Every run finished under the run-directory contract, and all were validated on the same set."""
    for group in groups:
        for run in group.runs:
            if not run.summary:
                raise ValueError(
                    f"{run.path / 'summary.json'} does not exist: vision.train writes it when a run "
                    "finishes; finish (resume) the run, or leave it out"
                )
            missing = [key for key in REQUIRED if run.summary.get(key) is None]
            if missing:
                raise ValueError(
                    f"{run.path / 'summary.json'} lacks {missing} (runtime.rundir contract); "
                    "retrain the run with the current vision.train"
                )
            unkeyed = [r for r in (*run.train, *run.valid) if not isinstance(r.get("iteration"), int)]
            if unkeyed:
                raise ValueError(
                    f"{run.path / 'metrics.jsonl'}: a {unkeyed[0].get('kind')} record has no integer "
                    '"iteration" (runtime.rundir contract); retrain the run with the current '
                    "vision.train"
                )
    runs = [run for group in groups for run in group.runs]
    ref = runs[0]
    for run in runs[1:]:
        for key, what in (("num_classes", "classes"), ("val_images", "validation images")):
            mine, theirs = _fact(run, key), _fact(ref, key)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(
                    f"{run.path} was validated with {key}={mine} but {ref.path} with {key}={theirs}: "
                    f"accuracies over different {what} do not compare; validate all runs on the same "
                    "dataset"
                )


def _fact(run: Run, key: str) -> Any:
    if key == "val_images":  # the size of the validation set, from the last validation record
        return run.valid[-1].get("images") if run.valid else None
    return run.summary.get(key)


def _accuracy_names(groups: list[RunGroup]) -> list[str]:
    """Top-1 and top-5, and the EMA model's when every run has one."""
    runs = [run for group in groups for run in group.runs]
    return [name for name in ACCURACIES if all(run.summary.get(name) is not None for run in runs)]


def _binomial_se(percent: float, images: Any) -> float | None:
    """Standard error (in points) of an accuracy measured on `images` independent images."""
    if not isinstance(images, int) or images < 1:
        return None
    p = percent / 100.0
    return 100.0 * math.sqrt(p * (1.0 - p) / images)


def accuracy_stats(group: RunGroup, names: list[str]) -> tuple[dict[str, Stat], list[dict[str, float]]]:
    per_seed = [{name: float(run.summary[name]) for name in names} for run in group.runs]
    images = _fact(group.runs[0], "val_images")
    stats = {name: Stat.of([row[name] for row in per_seed], _binomial_se(per_seed[0][name], images)) for name in names}
    return stats, per_seed


def _stat(values: list[float]) -> dict[str, Any] | None:
    return asdict(Stat.of(values)) if values else None


def _images_per_s(run: Run) -> float | None:
    """Mean training throughput over the logged intervals after the first (which holds the start-up)."""
    rates = [float(r["images_per_s"]) for r in run.train if isinstance(r.get("images_per_s"), (int, float))]
    rates = rates[1:] if len(rates) > 1 else rates
    return statistics.fmean(rates) if rates else None


def _numbers(group: RunGroup, key: str) -> list[float]:
    return [float(v) for v in (run.summary.get(key) for run in group.runs) if isinstance(v, (int, float))]


def group_row(group: RunGroup, base: RunGroup) -> dict[str, Any]:
    first = group.runs[0].summary
    rates = [rate for rate in map(_images_per_s, group.runs) if rate is not None]

    def ratio(key: str) -> float:
        return float(first[key]) / float(base.runs[0].summary[key])

    return {
        "model": str(first["model"]),
        "seeds": [run.seed for run in group.runs],
        "num_experts": first.get("num_experts"),
        "total_params": first["total_params"],
        "params_vs_baseline": ratio("total_params"),
        "macs": first["macs"],
        "macs_vs_baseline": ratio("macs"),
        "img_size": first.get("img_size"),
        "num_classes": first.get("num_classes"),
        "val_images": _fact(group.runs[0], "val_images"),
        "iterations": [run.summary["iterations"] for run in group.runs],
        "epochs": [run.summary["epochs"] for run in group.runs],
        "final_val_loss": _stat(_numbers(group, "final_val_loss")),
        "train_loss": _stat(_numbers(group, "train_loss")),
        "images_per_s": _stat(rates),
        "seconds": _stat(_numbers(group, "seconds")),
    }


def accuracy_table(labels: list[str], stats: list[dict[str, Stat]], names: list[str]) -> str:
    header = ["Metric", *labels, *[f"Δ {label} − {labels[0]}" for label in labels[1:]]]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in names:
        cells = [stat_text(s[name], scale=1.0) for s in stats]
        deltas = [delta_text(stats[0][name], s[name], scale=1.0) for s in stats[1:]]
        lines.append("| " + " | ".join([ACCURACIES[name], *cells, *deltas]) + " |")
    return "\n".join(lines) + "\n"


def _stat_cell(stat: dict[str, Any] | None, digits: int) -> str:
    if stat is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def _with_ratio(value: float, ratio: float, what: str, is_base: bool) -> str:
    return human(value) + ("" if is_base else f" ({ratio:.2f}x the {what})")


def _distinct(values: list[Any]) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values))


def model_table(labels: list[str], rows: list[dict[str, Any]]) -> str:
    img = [r["img_size"] for r in rows]
    fields = [
        ("Model", [str(r["model"]) for r in rows]),
        ("Seeds", [", ".join("?" if s is None else str(s) for s in r["seeds"]) for r in rows]),
        ("Experts", [str(r["num_experts"]) if r["num_experts"] else "-" for r in rows]),  # static: 0/none
        (
            "Total parameters",
            [_with_ratio(r["total_params"], r["params_vs_baseline"], "parameters", i == 0) for i, r in enumerate(rows)],
        ),
        (
            "MACs per image",
            [_with_ratio(r["macs"], r["macs_vs_baseline"], "multiply-adds", i == 0) for i, r in enumerate(rows)],
        ),
        ("Image size", ["n/a" if s is None else f"{s}x{s}" for s in img]),
        ("Final validation loss", [_stat_cell(r["final_val_loss"], 4) for r in rows]),
        ("Final training loss", [_stat_cell(r["train_loss"], 4) for r in rows]),
        ("Training images/s", [_stat_cell(r["images_per_s"], 1) for r in rows]),
        ("Iterations", [_distinct(r["iterations"]) for r in rows]),
        ("Epochs", [_distinct(r["epochs"]) for r in rows]),
        ("Training time (s)", [_stat_cell(r["seconds"], 1) for r in rows]),
    ]
    lines = ["| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(rows)]
    for title, cells in fields:
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_vision_report(groups: list[RunGroup], out_dir: Path) -> tuple[str, str, dict[str, Any]]:
    """(full markdown report, the tables to print, results.json content); also draws the two PNGs into out_dir."""
    from evals.plots import plot_losses, plot_val_accuracy

    check_vision_runs(groups)
    names = _accuracy_names(groups)
    labels = [g.label for g in groups]
    computed = [accuracy_stats(group, names) for group in groups]
    stats = [s for s, _ in computed]
    rows = [group_row(group, groups[0]) for group in groups]
    table = accuracy_table(labels, stats, names)
    models = model_table(labels, rows)
    multi = max(len(g.runs) for g in groups) > 1
    spread = (
        "cells are mean ± standard deviation over seeds; a delta's ± is the standard error of the difference of "
        "the means"
        if multi
        else "one seed per model; a delta's ± is the standard error from the finite number of validation images "
        "only (binomial, taken as independent: conservative, both models saw the same images); give a directory of "
        "per-seed runs to measure seed-to-seed noise"
    )
    images = rows[0]["val_images"]
    plot_val_accuracy(groups, out_dir / "accuracy.png")
    plot_losses(groups, out_dir / "loss.png")
    report = "\n".join(
        [
            "# ParameterNet comparison",
            "",
            "Runs: "
            + "; ".join(
                f"**{g.label}** = `{g.path}` ({len(g.runs)} seed{'s' if len(g.runs) > 1 else ''})" for g in groups
            )
            + ".",
            "",
            "## Validation accuracy (%)",
            "",
            f"Image classification, at the end of training, on {images if images is not None else 'all'} validation "
            f"images. Baseline: {groups[0].label}; {spread}; * marks |delta| > 2 standard errors.",
            "",
            table,
            "![accuracy](accuracy.png)",
            "",
            "## Models",
            "",
            "MACs: multiply-adds of one forward pass of one image at the run's image size.",
            "",
            models,
            "![loss](loss.png)",
            "",
        ]
    )
    data = {
        "task": "vision",
        "baseline": groups[0].label,
        "metrics": names,
        "groups": [
            {
                "label": g.label,
                "path": str(g.path),
                "runs": [str(r.path) for r in g.runs],
                "accuracy": {name: asdict(stat) for name, stat in s.items()},
                "accuracy_per_seed": per_seed,
                "delta_vs_baseline": {
                    name: dict(zip(("delta", "stderr"), delta(stats[0][name], stat))) for name, stat in s.items()
                },
                **row,
            }
            for g, (s, per_seed), row in zip(groups, computed, rows)
        ],
    }
    return report, table + "\n" + models, data
