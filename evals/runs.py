"""Training run directories as the trainers write them (runtime.rundir), and groups of runs that differ only in the
seed.

A run directory RUN/ holds `config.yaml` (resolved training config), `metrics.jsonl` (train and valid records keyed by
"iteration") and `summary.json` (written when the run finishes: runtime.rundir.SUMMARY_KEYS plus the task's own keys).
Its task is summary.json's "task": "llm" (llm.train) or "vision" (vision.train).
An LLM run also holds `hf/` (the exported model) and, once evaluated, `eval/results/*.json` (every lm-eval
evaluation, written by `python -m evals.zero_shot --model RUN`) with `eval/results.json`, the headline one (see
evals.results).
A directory whose subdirectories are run directories (e.g. OUT/parameternet/seed1, seed2, ...) is one group: the same
configuration repeated with several seeds, reported as mean and standard deviation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RUN_MARKERS = ("metrics.jsonl", "summary.json", "hf", "checkpoints", "eval")
RESULTS_PATH = Path("eval") / "results.json"
LLM, VISION = "llm", "vision"
TASKS = (LLM, VISION)
# The training loss each task logs in its train records (the LLM's "loss" would include the router's aux loss).
TRAIN_LOSS_KEY = {LLM: "lm_loss", VISION: "loss"}


@dataclass
class Run:
    path: Path
    task: str  # LLM or VISION
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    train: list[dict[str, Any]] = field(default_factory=list)  # {"kind": "train", "iteration", <TRAIN_LOSS_KEY>, ...}
    valid: list[dict[str, Any]] = field(default_factory=list)  # {"kind": "valid", "iteration", "val_loss", ...}
    # {"kind": "zero_shot", "iteration", "tokens", <task>: accuracy, ...}: the trainer's --eval_tasks
    zero_shot: list[dict[str, Any]] = field(default_factory=list)

    @property
    def results_path(self) -> Path:
        """The headline evaluation; all of them are in `eval_dir` (evals.results.load_evaluations)."""
        return self.path / RESULTS_PATH

    @property
    def eval_dir(self) -> Path:
        return self.results_path.parent

    @property
    def train_loss_key(self) -> str:
        return TRAIN_LOSS_KEY[self.task]

    @property
    def seed(self) -> int | None:
        seed = self.summary.get("seed", self.config.get("seed"))
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    @property
    def final_iteration(self) -> int | None:
        """The iteration the run finished at (summary.json), None when unknown or not finished."""
        value = self.summary.get("iterations")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def final_val_loss(self) -> float | None:
        value = self.summary.get("final_val_loss")
        if isinstance(value, (int, float)):
            return float(value)
        return float(self.valid[-1]["val_loss"]) if self.valid else None


@dataclass
class RunGroup:
    label: str
    path: Path
    runs: list[Run]

    @property
    def task(self) -> str:
        return self.runs[0].task


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


def _read_records(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    if not path.is_file():
        return records
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                # A run killed mid-write may leave a torn last line; anything earlier is damage worth reporting.
                if not f.readline():
                    break
                raise ValueError(f"{path}:{number}: not a JSON line ({exc})") from exc
    return records


def _task_of(path: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """summary.json's "task"; a run without one (unfinished, or written before the field existed) is an LLM run
    unless its train records carry the vision trainer's "loss" and no "lm_loss"."""
    task = summary.get("task")
    if task is not None:
        if task not in TASKS:
            raise ValueError(
                f"{path / 'summary.json'}: task={task!r} is not one evals.compare reports; it knows {', '.join(TASKS)}"
            )
        return str(task)
    train = [r for r in records if r.get("kind") == "train"]
    if train and all("loss" in r and "lm_loss" not in r for r in train):
        return VISION
    return LLM


def load_run(path: Path) -> Run:
    if not path.exists():
        raise FileNotFoundError(f"run directory {path} does not exist")
    if not is_run_dir(path):
        raise ValueError(f"{path} is not a run directory (it has none of {', '.join(RUN_MARKERS)})")
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        loaded = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        config = loaded if isinstance(loaded, dict) else {}
    summary: dict[str, Any] = {}
    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    records = _read_records(path / "metrics.jsonl")
    task = _task_of(path, summary, records)
    loss_key = TRAIN_LOSS_KEY[task]
    # A skipped (non-finite) step logs its loss as null: it has no loss to report or plot.
    train = [r for r in records if r.get("kind") == "train" and r.get(loss_key) is not None]
    valid = [r for r in records if r.get("kind") == "valid" and "val_loss" in r]
    zero_shot = [r for r in records if r.get("kind") == "zero_shot"]
    return Run(path, task, config, summary, train, valid, zero_shot)


def check_one_task(groups: list[RunGroup]) -> str:
    """The task every run shares; LLM and vision runs have nothing in common to report side by side."""
    by_task: dict[str, list[Path]] = {}
    for group in groups:
        for run in group.runs:
            by_task.setdefault(run.task, []).append(run.path)
    if len(by_task) > 1:
        llm, vision = by_task.get(LLM, []), by_task.get(VISION, [])
        raise ValueError(
            f"cannot compare LLM runs ({', '.join(map(str, llm))}) with vision runs "
            f"({', '.join(map(str, vision))}): compare each kind on its own"
        )
    return next(iter(by_task))


def load_group(path: Path, label: str | None = None) -> RunGroup:
    """A run directory (one seed), or a directory of run directories (several seeds of one configuration)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run directory {path} does not exist")
    if is_run_dir(path):
        runs = [load_run(path)]
    else:
        children = sorted(p for p in path.iterdir() if is_run_dir(p)) if path.is_dir() else []
        if not children:
            raise ValueError(
                f"{path} is neither a run directory (with {', '.join(RUN_MARKERS)}) nor a directory of run "
                "directories (one per seed)"
            )
        runs = [load_run(p) for p in children]
    group = RunGroup(label or path.name, path, runs)
    check_one_task([group])
    # One group is one configuration over seeds: runs of different models in one directory are separate columns.
    models = {str(run.summary["model"]) for run in runs if "model" in run.summary}
    if len(models) > 1:
        raise ValueError(
            f"{path} holds runs of different models ({', '.join(sorted(models))}), but a directory of "
            "runs is one configuration repeated over seeds; pass each run directory on its own"
        )
    return group


def stale_evaluation(run: Run, steps: list[int | None]) -> str | None:
    """Why none of a finished run's evaluations (at `steps`) is of its final weights, or None when one is (or the
    steps are unknown): an evaluation of an earlier checkpoint is never paired with the final loss."""
    final = run.final_iteration
    if final is None or not steps or any(step is None or step == final for step in steps):
        return None
    shown = ", ".join(str(step) for step in sorted({s for s in steps if s is not None}))
    return (
        f"{run.path} was evaluated at step {shown} but finished at iteration {final}: that evaluation is of earlier "
        f"weights; evaluate it again (python -m evals.zero_shot --model {run.path}; launch/compare.sh does it)"
    )


def unfinished_runs(groups: list[RunGroup]) -> str | None:
    """One line naming every run that has not finished and where it stopped, or None when all have."""
    from runtime.rundir import run_state

    stopped = []
    for group in groups:
        for run in group.runs:
            state = run_state(run.path)
            if not state.finished:
                stopped.append(f"{run.path} is {state.describe()}")
    if not stopped:
        return None
    return (
        f"{'; '.join(stopped)}. Only finished runs are compared: finish each (the same training command with "
        f"--resume auto continues it) or leave it out"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m evals.runs evaluated RUN`: exit 0 when RUN finished and holds an evaluation of its final iteration
    (for launch/compare.sh, which evaluates again otherwise), else 1 with the reason."""
    import sys

    from evals.results import load_evaluations
    from runtime.errors import print_error
    from runtime.rundir import run_state

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "evaluated":
        print_error("usage: python -m evals.runs evaluated RUN_DIR", prog="evals.runs")
        return 2
    path = Path(args[1])
    state = run_state(path)
    if not state.finished:
        print_error(f"{path}: the training is {state.describe()}", prog="evals.runs")
        return 1
    run = load_run(path)
    steps = [e.step for e in load_evaluations(run.eval_dir)]
    why = stale_evaluation(run, steps) if steps else f"{path} has no evaluation in {run.eval_dir}"
    if why is not None:
        print_error(why, prog="evals.runs")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
