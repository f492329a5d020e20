"""Accuracy over the seeds of one compared group: what evals.compare computes and evals.plots draws.

Its own module so that the report (compare) and its plots (plots) both import it and neither imports the other.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

AVERAGE = "Average"  # the row / bar of the unweighted mean over tasks


@dataclass(frozen=True)
class Stat:
    """A value over the seeds of one group: mean, sample std (None for one seed), and a standard error of the mean."""

    mean: float
    std: float | None
    sem: float | None  # seeds: std / sqrt(n); one seed: lm-eval's stderr over documents
    n: int

    @staticmethod
    def of(values: list[float], single_stderr: float | None = None) -> Stat:
        if len(values) > 1:
            std = statistics.stdev(values)
            return Stat(statistics.fmean(values), std, std / math.sqrt(len(values)), len(values))
        return Stat(values[0], None, single_stderr, 1)


@dataclass(frozen=True)
class GroupScores:
    label: str
    per_task: dict[str, Stat]  # benchmark name (and AVERAGE) -> accuracy
    metrics: dict[str, str]  # benchmark name -> metric reported
    per_seed: list[dict[str, float]]  # raw accuracies per seed, per task
