"""Training run directories as the trainer writes them, and groups of runs that differ only in the seed.

A run directory RUN/ holds `config.yaml` (resolved training config), `metrics.jsonl` (train and valid lines),
`summary.json` (parameters, FLOPs per token, final validation loss), `hf/` (the exported model) and, once evaluated,
`eval/results/*.json` (every lm-eval evaluation, written by `python -m evals.zero_shot --model RUN`) with
`eval/results.json`, the headline one (see evals.results).
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


@dataclass
class Run:
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    train: list[dict[str, Any]] = field(default_factory=list)  # {"kind": "train", "tokens", "lm_loss", ...}
    valid: list[dict[str, Any]] = field(default_factory=list)  # {"kind": "valid", "tokens", "val_loss", ...}

    @property
    def results_path(self) -> Path:
        """The headline evaluation; all of them are in `eval_dir` (evals.results.load_evaluations)."""
        return self.path / RESULTS_PATH

    @property
    def eval_dir(self) -> Path:
        return self.results_path.parent

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed")
        return int(seed) if isinstance(seed, int) else None

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


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    train: list[dict[str, Any]] = []
    valid: list[dict[str, Any]] = []
    if not path.is_file():
        return train, valid
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                # A run killed mid-write may leave a torn last line; anything earlier is damage worth reporting.
                if not f.readline():
                    break
                raise ValueError(f"{path}:{number}: not a JSON line ({exc})") from exc
            # A skipped (non-finite) step logs lm_loss null: it has no loss to report or plot.
            if record.get("kind") == "train" and record.get("lm_loss") is not None:
                train.append(record)
            elif record.get("kind") == "valid" and "val_loss" in record:
                valid.append(record)
    return train, valid


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
    train, valid = _read_metrics(path / "metrics.jsonl")
    return Run(path, config, summary, train, valid)


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
    return RunGroup(label or path.name, path, runs)
