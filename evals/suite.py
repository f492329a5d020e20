"""The zero-shot benchmark suite: official lm-eval task names, their offline twins, and which metric to report."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE_SUFFIX = "_offline"


@dataclass(frozen=True)
class Benchmark:
    name: str  # the official lm-eval task name
    metrics: tuple[str, ...]  # as the official task defines them

    @property
    def offline_task(self) -> str:
        return self.name + OFFLINE_SUFFIX

    @property
    def primary_metric(self) -> str:
        """acc_norm where lm-eval defines it (length-normalised, the usual headline number), else acc."""
        return "acc_norm" if "acc_norm" in self.metrics else "acc"


# The LLaMA paper's zero-shot common-sense suite (Touvron et al. 2023, table 3), as lm-eval names it.
LLAMA_ZERO_SHOT: tuple[Benchmark, ...] = (
    Benchmark("arc_easy", ("acc", "acc_norm")),
    Benchmark("arc_challenge", ("acc", "acc_norm")),
    Benchmark("boolq", ("acc",)),
    Benchmark("hellaswag", ("acc", "acc_norm")),
    Benchmark("openbookqa", ("acc", "acc_norm")),
    Benchmark("piqa", ("acc", "acc_norm")),
    Benchmark("social_iqa", ("acc",)),
    Benchmark("winogrande", ("acc",)),
)
EXTRA: tuple[Benchmark, ...] = (
    Benchmark("lambada_openai", ("perplexity", "acc")),
    Benchmark("sciq", ("acc", "acc_norm")),
)
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in LLAMA_ZERO_SHOT + EXTRA}
SUITE_ALIASES = ("llama", "llama_zero_shot")  # --tasks llama: the 8 tasks above


def canonical_name(task: str) -> str:
    """Official name of a task as it appears in lm-eval results (offline twins lose their suffix)."""
    return task[: -len(OFFLINE_SUFFIX)] if task.endswith(OFFLINE_SUFFIX) else task


def primary_metric(task: str, available: set[str] | None = None) -> str:
    """The metric reported for `task`; for tasks outside the suite, acc_norm if present in `available`, else acc."""
    bench = BENCHMARKS.get(canonical_name(task))
    if bench is not None:
        return bench.primary_metric
    return "acc_norm" if available and "acc_norm" in available else "acc"


def resolve_tasks(
    spec: str | list[str],
    offline: bool,
    flag: str = "--tasks",
    hub_fix: str = "other lm-eval tasks need --online and hub access",
) -> list[str]:
    """Comma-separated task names (or `llama`) -> lm-eval task names, offline twins when `offline`.

    Online, names outside the suite are passed to lm-eval as they are (it knows thousands); offline, only the
    benchmarks shipped in evals/tasks exist, and anything else is refused here rather than deep inside lm-eval.
    Errors name the caller's `flag` (evals.zero_shot's --tasks, the trainer's --eval_tasks) and its way to the hub's
    tasks (`hub_fix`).
    """
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise ValueError(f"{flag} names no task; give task names, e.g. {flag} arc_easy,piqa, or {flag} llama")
    out: list[str] = []
    for name in names:
        expanded = [b.name for b in LLAMA_ZERO_SHOT] if name in SUITE_ALIASES else [canonical_name(name)]
        for base in expanded:
            if offline and base not in BENCHMARKS:
                raise ValueError(
                    f"{flag}: unknown task {name!r} for the offline suite; known: {', '.join(BENCHMARKS)} "
                    f"(or 'llama' for the LLaMA zero-shot suite); {hub_fix}"
                )
            task = BENCHMARKS[base].offline_task if offline and base in BENCHMARKS else base
            if task not in out:
                out.append(task)
    return out


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when the user asked for offline mode (HF_*_OFFLINE) or huggingface.co cannot be reached."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def enter_offline_mode() -> None:
    """Tell huggingface_hub / datasets / transformers not to try the network (read at their import time)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
