"""Reading lm-eval results JSON: the reported metric per task, sample counts, and the markdown summary table; and
the store of every evaluation of one model.

Evaluations are kept, never replaced by another one: `python -m evals.zero_shot` writes each to
`EVAL_DIR/results/<key>.json` (+ `.md`), the key made of the model's training step, the tasks and the limit, so only
the same evaluation repeated replaces its own file. `EVAL_DIR/results.json` (+ `.md`) is the headline: a copy of the
stored evaluation that covers the most tasks, then the most documents, then the latest step, then the newest - so a
quick 2-task check never hides the 8-task suite, and a full evaluation of a later checkpoint supersedes an earlier
one. A results.json written before the store existed is moved into it (as an evaluation of its own) first.
`evals.compare` picks, for every run, the evaluation with the task set and limit that all runs share.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.suite import BENCHMARKS, canonical_name, primary_metric
from runtime.fsutil import OutputRefused, run_inside, write_text_atomic

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
        raise FileNotFoundError(
            f"no lm-eval results at {path}; evaluate the run first: python -m evals.zero_shot --model ..."
        )
    with path.open(encoding="utf-8") as f:
        return json.load(f)


STORE = "results"  # EVAL_DIR/results/<key>.json: every evaluation
HEADLINE = "results.json"


@dataclass(frozen=True)
class Evaluation:
    """One stored lm-eval run: what it covered (tasks, limit, documents), on which model step, and when."""

    path: Path
    results: dict[str, Any]
    tasks: tuple[str, ...]  # benchmark names, suite order
    limit: float | None  # lm-eval's --limit (None: every document)
    documents: int
    step: int | None  # the training iteration of the evaluated weights, when known
    evaluated_at: float  # seconds since the epoch

    @property
    def key(self) -> str:
        return evaluation_key(self.tasks, self.limit, self.step)

    @property
    def rank(self) -> tuple[int, int, int, float]:
        """The headline is the evaluation with the highest rank (see the module docstring)."""
        return len(self.tasks), self.documents, -1 if self.step is None else self.step, self.evaluated_at

    def describe(self) -> str:
        limit = "all documents" if self.limit is None else f"limit {self.limit:g}"
        step = "step unknown" if self.step is None else f"step {self.step}"
        return f"{len(self.tasks)} tasks ({', '.join(self.tasks)}), {limit}, {step}"


def evaluation_key(tasks: tuple[str, ...], limit: float | None, step: int | None) -> str:
    names = "+".join(tasks)
    if len(names) > 120:  # file names stay short; the hash keeps long task lists apart
        names = f"{len(tasks)}tasks-{hashlib.sha1(names.encode()).hexdigest()[:10]}"
    limit_text = "all" if limit is None else f"limit{limit:g}"
    step_text = "step-unknown" if step is None else f"step{step:08d}"
    return f"{step_text}_{names}_{limit_text}"


def as_evaluation(results: dict[str, Any], path: Path) -> Evaluation:
    """Describe lm-eval's results dict (ValueError if it is not one)."""
    scores = task_scores(results, str(path))
    limit = results.get("config", {}).get("limit") if isinstance(results.get("config"), dict) else None
    meta = results.get("evals") if isinstance(results.get("evals"), dict) else {}
    step = meta.get("step")
    when = meta.get("evaluated_at", results.get("date"))
    if not isinstance(when, (int, float)):
        when = path.stat().st_mtime if path.exists() else 0.0
    return Evaluation(
        path,
        results,
        tuple(s.name for s in scores),
        float(limit) if isinstance(limit, (int, float)) else None,
        sum(s.samples for s in scores),
        int(step) if isinstance(step, int) else None,
        float(when),
    )


def load_evaluation(path: Path) -> Evaluation:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not readable as lm-eval results JSON ({exc})") from exc
    if not isinstance(results, dict):
        raise ValueError(f"{path}: not an lm-eval results JSON (no 'results' object)")
    return as_evaluation(results, path)


def load_evaluations(eval_dir: Path) -> list[Evaluation]:
    """Every evaluation under `eval_dir`: the store, plus a headline results.json older than the store."""
    found = [load_evaluation(p) for p in sorted((eval_dir / STORE).glob("*.json"))]
    keys = {e.key for e in found}
    headline = eval_dir / HEADLINE
    if headline.is_file():
        legacy = load_evaluation(headline)
        if legacy.key not in keys:
            found.append(legacy)
    return found


def best(evaluations: list[Evaluation]) -> Evaluation:
    return max(evaluations, key=lambda e: e.rank)


def check_eval_dir(eval_dir: Path) -> None:
    """Refuse, before any evaluation runs, an output directory the store cannot live in without loss."""
    sign = run_inside(eval_dir)
    if sign is not None:
        raise OutputRefused(
            f"--output_dir {eval_dir}: {sign} belongs to a training run's checkpoints, which are "
            f"never written into; choose a directory outside them (default: RUN/eval)"
        )
    if eval_dir.exists() and not eval_dir.is_dir():
        raise OutputRefused(f"--output_dir {eval_dir} is a file; give a directory (default: RUN/eval)")
    headline, store = eval_dir / HEADLINE, eval_dir / STORE
    for path in (headline, store):
        if path.is_dir() != (path == store) and path.exists():
            raise OutputRefused(
                f"--output_dir {eval_dir}: {path} is in the way of the evaluation store; move it "
                f"away or choose another --output_dir"
            )
    if headline.is_file():
        try:
            load_evaluation(headline)
        except ValueError as exc:
            raise OutputRefused(
                f"--output_dir {eval_dir}: {headline} was not written by lm-eval or evals.zero_shot "
                f"({exc}); it is never replaced: move it away or choose another --output_dir"
            ) from exc


def store_evaluation(eval_dir: Path, results: dict[str, Any], markdown: str) -> tuple[Evaluation, Evaluation]:
    """Keep `results` in the store (replacing only the same evaluation repeated) and rewrite the headline;
    returns (this evaluation, the headline)."""
    check_eval_dir(eval_dir)
    results.setdefault("evals", {}).setdefault("evaluated_at", time.time())
    store = eval_dir / STORE
    headline = eval_dir / HEADLINE
    if headline.is_file():  # written before the store existed: keep it as an evaluation of its own
        legacy = load_evaluation(headline)
        if not (store / f"{legacy.key}.json").exists():
            write_text_atomic(store / f"{legacy.key}.json", headline.read_text(encoding="utf-8"))
            md = headline.with_suffix(".md")
            if md.is_file():
                write_text_atomic(store / f"{legacy.key}.md", md.read_text(encoding="utf-8"))
    evaluation = as_evaluation(results, store / "new.json")
    text = json.dumps(results, indent=2, default=_not_serializable) + "\n"
    write_text_atomic(store / f"{evaluation.key}.json", text)
    write_text_atomic(store / f"{evaluation.key}.md", markdown)
    evaluation = load_evaluation(store / f"{evaluation.key}.json")
    top = best(load_evaluations(eval_dir))
    write_text_atomic(headline, top.path.read_text(encoding="utf-8"))
    top_md = top.path.with_suffix(".md")
    if top_md.is_file():
        write_text_atomic(headline.with_suffix(".md"), top_md.read_text(encoding="utf-8"))
    return evaluation, top


def _not_serializable(value: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(value)
