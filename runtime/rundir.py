"""The run-directory contract, the same for every trainer (llm.train, vision.train) and read by evals:

RUN/config.yaml      the resolved training config (every field), written when the run starts
RUN/metrics.jsonl    one JSON object a line: {"kind": "train" | "valid" | "skip", "iteration": N, ...}; records
                     past a resumed checkpoint's iteration are dropped when the run resumes (runtime.metrics)
RUN/tensorboard/     the same scalars for TensorBoard
RUN/checkpoints/     iter_NNNNNNN/ checkpoints (runtime.checkpoint)
RUN/summary.json     written once, at the end of a finished run: {"task": "llm" | "vision", "model",
                     "total_params", "iterations", "seed", "world_size", "final_val_loss", "code", ...} plus the
                     task's own keys (llm: active_params, flops_per_token, tokens; vision: macs, top1, top5); "code"
                     is the commit that trained it (`code_version`). A run stopped by a
                     signal has none (or, resumed past an earlier finish, one older than its newest checkpoint): it
                     has not finished (`run_state`).
RUN/.run.lock        while a run is alive: its host, PID and start time; rank 0 holds an exclusive flock on it
                     (`claim_run_dir`), so a second training into RUN is refused at start
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from runtime.errors import TrainingError
from runtime.fsutil import ExclusiveLock, LockBusy, write_text_atomic

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
RUN_LOCK = ".run.lock"
# Every summary names these; evals.runs reads them whatever the task.
SUMMARY_KEYS = ("task", "model", "total_params", "iterations", "seed", "world_size", "final_val_loss")


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Written when a run starts or resumes. A run under way has not finished: the summary.json of an earlier finish
    (a finished run resumed to train further, say) goes, and the run writes a new one when it finishes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG, yaml.safe_dump(config, sort_keys=False))
    (run_dir / SUMMARY).unlink(missing_ok=True)


def code_version() -> str:
    """The code that is running: the git commit of this checkout ("+dirty" with uncommitted changes to tracked
    files), or the installed package's version outside a checkout. A study's runs name the commit that trained them."""
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"package {version('parameternet-stack')}"
        except PackageNotFoundError:
            return "unknown"
    return commit + ("+dirty" if dirty else "")


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    if missing:
        raise ValueError(f"summary.json needs {missing} (runtime.rundir.SUMMARY_KEYS)")
    summary = {**summary, "code": summary.get("code", code_version())}
    write_text_atomic(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class RunClaim:
    """This process's share of a run directory: the lock (held by global rank 0 only) and the run's token, the same
    on every rank, which names the run's temporary checkpoint directories (runtime.checkpoint)."""

    lock: ExclusiveLock | None
    token: str

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def claim_run_dir(run_dir: Path) -> RunClaim:
    """Lock `run_dir` for this run (rank 0 of node 0 holds RUN/.run.lock until `release()` or its death). Raises
    TrainingError, naming the holder, when another live run holds it. Every rank must call this (two collectives)."""
    import torch
    import torch.distributed as dist

    from runtime import collectives
    from runtime.dist import rank

    lock, refusal = None, None
    if rank() == 0:
        try:
            lock = ExclusiveLock.acquire(
                run_dir / RUN_LOCK,
                f"output_dir={str(run_dir)!r}",
                "wait for that run to end (or stop it), or choose another --output_dir",
            )
        except LockBusy as err:
            refusal = str(err)
        except OSError as err:  # not a directory, not writable: refused on every rank, not a hang on the others
            refusal = (
                f"output_dir={str(run_dir)!r}: cannot create the run's lock file {run_dir / RUN_LOCK} ({err}); "
                f"choose a writable --output_dir"
            )
    if not collectives.all_ranks(refusal is None):
        raise TrainingError(refusal or f"output_dir={str(run_dir)!r} is in use by another run (rank 0 names it)")
    # rank 0's random number, spread by a MAX reduction (the other ranks give 0)
    mine = secrets.randbits(48) if rank() == 0 else 0
    token = int(collectives.all_reduce_values([mine], dist.ReduceOp.MAX, dtype=torch.int64)[0])
    return RunClaim(lock, f"{token:012x}")


def claim_and_set_up(run_dir: Path, set_up: Callable[[], None]) -> RunClaim:
    """Both trainers' start: claim `run_dir` before any check that reads it (a run that has not written anything yet
    is visible only through its lock), then `set_up()`; a set-up that fails or is refused releases the claim (and the
    directory, if this run created it and left it empty). Once set up, the temporary checkpoints of dead runs go
    (runtime.checkpoint.remove_dead_saves): a refused run leaves the directory as it was."""
    claim = claim_run_dir(run_dir)
    try:
        set_up()
    except BaseException:
        claim.release()
        raise
    if claim.lock is not None:  # the lock's holder: every other run's temporaries are a dead run's
        from runtime.checkpoint import remove_dead_saves

        for line in remove_dead_saves(run_dir / CHECKPOINTS, claim.token):
            print(f"checkpoints: {line}", flush=True)
    return claim


@dataclass(frozen=True)
class RunState:
    """Where a run directory stands: finished (summary.json at least as new as its newest checkpoint), else stopped
    at `iteration` (its newest complete checkpoint; None: none yet) of `target` (config.yaml's train_iters, when
    set)."""

    finished: bool
    iteration: int | None
    target: int | None

    def describe(self) -> str:
        if self.finished:
            return f"finished at iteration {self.iteration}"
        where = "before its first checkpoint" if self.iteration is None else f"at iteration {self.iteration}"
        return f"not finished (stopped {where}{f' of {self.target}' if self.target else ''}, no final summary.json)"


def run_state(run_dir: Path) -> RunState:
    run_dir = Path(run_dir)
    newest = None
    checkpoints = run_dir / CHECKPOINTS
    if checkpoints.is_dir():
        done = [p.name for p in checkpoints.iterdir() if (p / "complete.json").is_file()]
        found = [int(m.group(1)) for m in (re.fullmatch(r"iter_(\d{7,})", name) for name in done) if m]
        newest = max(found) if found else None
    target = None
    if (run_dir / CONFIG).is_file():
        try:
            config = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8"))
        except yaml.YAMLError:
            config = None
        value = config.get("train_iters") if isinstance(config, dict) else None
        target = value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
    try:
        summary = read_summary(run_dir)
    except (OSError, ValueError):
        summary = {}
    iterations = summary.get("iterations")
    if not isinstance(iterations, int) or isinstance(iterations, bool):
        iterations = None  # a summary written by hand or before the field existed: finished, step unknown
    # A summary older than the newest checkpoint, or short of a train_iters raised since, is an earlier finish (the
    # vision trainer may end at its last epoch before train_iters: its target is not checked).
    if summary.get("task") == "vision":
        target = None
    if summary and (iterations is None or ((newest is None or iterations >= newest) and iterations >= (target or 0))):
        return RunState(True, iterations if iterations is not None else newest, target)
    return RunState(False, newest, target)


def main(argv: list[str] | None = None) -> int:
    """`python -m runtime.rundir finished RUN`: exit 0 if RUN finished, else 3 with one line saying where it stopped
    (for the launch scripts, which must not report a run that a signal stopped as if it had finished)."""
    import sys

    from runtime.errors import print_error

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "finished":
        print_error("usage: python -m runtime.rundir finished RUN_DIR", prog="runtime.rundir")
        return 2
    state = run_state(Path(args[1]))
    if state.finished:
        print(state.iteration)
        return 0
    print_error(f"{args[1]}: the training is {state.describe()}", prog="runtime.rundir")
    return 3


if __name__ == "__main__":
    raise SystemExit(main())
