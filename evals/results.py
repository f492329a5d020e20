"""Reading lm-eval results JSON: the reported metric per task, sample counts, and the markdown summary table."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.suite import BENCHMARKS, canonical_name, primary_metric

FILTER = "none"  # lm-eval's key suffix for metrics computed without a filter ("acc,none")


@dataclass(frozen=True)
class TaskScore:
    name: str  # official benchmark name
    task: str  # the lm-eval task that ran (offline twin or official)
    metric: str
    value: float
    stderr: float | None  # lm-eval's standard error of the mean over documents
    samples: int  # documents evaluated


def metric_value(task_results: dict[str, Any], metric: str) -> tuple[float, float | None]:
    key = f"{metric},{FILTER}"
    if key not in task_results:
        raise KeyError(metric)
    stderr = task_results.get(f"{metric}_stderr,{FILTER}")
    stderr_value = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
    return float(task_results[key]), stderr_value


def task_scores(results: dict[str, Any], source: str = "results") -> list[TaskScore]:
    """The reported (primary) metric of every task in an lm-eval results dict, suite order first."""
    if not isinstance(results.get("results"), dict):
        raise ValueError(f"{source}: not an lm-eval results JSON (no 'results' object)")
    scores: list[TaskScore] = []
    for task, values in results["results"].items():
        available = {k.split(",")[0] for k in values if "," in k}
        metric = primary_metric(task, available)
        if metric not in available:
            continue  # a group row, or a task without accuracy (not part of the accuracy table)
        value, stderr = metric_value(values, metric)
        n = results.get("n-samples", {}).get(task, {}).get("effective", 0)
        scores.append(TaskScore(canonical_name(task), task, metric, value, stderr, int(n)))
    order = {name: i for i, name in enumerate(BENCHMARKS)}
    return sorted(scores, key=lambda s: (order.get(s.name, len(order)), s.name))


def summary_markdown(scores: list[TaskScore]) -> str:
    """Task | metric | accuracy % +- stderr | documents, with the unweighted average over tasks."""
    lines = ["| Task | Metric | Accuracy (%) | Documents |", "|---|---|---:|---:|"]
    for s in scores:
        err = f" ± {100 * s.stderr:.2f}" if s.stderr is not None else ""
        lines.append(f"| {s.name} | {s.metric} | {100 * s.value:.2f}{err} | {s.samples} |")
    if scores:
        mean = sum(s.value for s in scores) / len(scores)
        lines.append(f"| **Average** | | **{100 * mean:.2f}** | |")
    return "\n".join(lines) + "\n"


def load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no lm-eval results at {path}; evaluate the run first: python -m evals.zero_shot --model ...")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name in the same directory, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
