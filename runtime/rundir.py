"""The run-directory contract, the same for every trainer (llm.train, vision.train) and read by evals:

RUN/config.yaml      the resolved training config (every field), written when the run starts
RUN/metrics.jsonl    one JSON object a line: {"kind": "train" | "valid" | "skip", "iteration": N, ...}; records
                     past a resumed checkpoint's iteration are dropped when the run resumes (runtime.metrics)
RUN/tensorboard/     the same scalars for TensorBoard
RUN/checkpoints/     iter_NNNNNNN/ checkpoints (runtime.checkpoint)
RUN/summary.json     written once, at the end of a finished run: {"task": "llm" | "vision", "model",
                     "total_params", "iterations", "seed", "world_size", "final_val_loss", ...} plus the task's own
                     keys (llm: active_params, flops_per_token, tokens; vision: macs, top1, top5)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from runtime.fsutil import write_text_atomic

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
# Every summary names these; evals.runs reads them whatever the task.
SUMMARY_KEYS = ("task", "model", "total_params", "iterations", "seed", "world_size", "final_val_loss")


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG, yaml.safe_dump(config, sort_keys=False))


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    if missing:
        raise ValueError(f"summary.json needs {missing} (runtime.rundir.SUMMARY_KEYS)")
    write_text_atomic(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else {}
