"""Values over the seeds of one compared group, and how the reports write them: what evals.compare and
evals.vision_report compute and evals.plots draws.

Its own module so that the reports (compare, vision_report) and the plots all import it and none imports another.
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
    sem: float | None  # seeds: std / sqrt(n); one seed: the evaluation's own stderr (documents, images)
    n: int

    @staticmethod
    def of(values: list[float], single_stderr: float | None = None) -> Stat:
        if len(values) > 1:
            std = statistics.stdev(values)
            return Stat(statistics.fmean(values), std, std / math.sqrt(len(values)), len(values))
        return Stat(values[0], None, single_stderr, 1)


def common_x(curves: list[dict[float, float]]) -> list[float]:
    """The x values every curve has ({x: y} each; the seeds of one arm log at the same steps)."""
    return sorted(set.intersection(*(set(c) for c in curves))) if curves else []


def band(curves: list[dict[float, float]]) -> tuple[list[float], list[float], list[float]]:
    """common_x and, at each, Stat.of's mean and sample std (0 for one curve) over the curves."""
    xs = common_x(curves)
    stats = [Stat.of([c[x] for c in curves]) for x in xs]
    return xs, [s.mean for s in stats], [s.std or 0.0 for s in stats]


@dataclass(frozen=True)
class GroupScores:
    label: str
    per_task: dict[str, Stat]  # benchmark name (and AVERAGE) -> accuracy
    metrics: dict[str, str]  # benchmark name -> metric reported
    per_seed: list[dict[str, float]]  # raw accuracies per seed, per task


def delta(a: Stat, b: Stat) -> tuple[float, float | None]:
    """b - a, with the standard error of the difference of two independent means."""
    se = math.sqrt(a.sem**2 + b.sem**2) if a.sem is not None and b.sem is not None else None
    return b.mean - a.mean, se


def stat_text(stat: Stat, scale: float = 100.0) -> str:
    """'mean ± std' (std only over several seeds), the values times `scale` (fractions -> percent by default)."""
    if stat.std is not None:
        return f"{scale * stat.mean:.2f} ± {scale * stat.std:.2f}"
    return f"{scale * stat.mean:.2f}"


def delta_text(a: Stat, b: Stat, scale: float = 100.0) -> str:
    """'+d ± se', and ' *' when |d| > 2 standard errors."""
    d, se = delta(a, b)
    text = f"{scale * d:+.2f}"
    if se is not None:
        text += f" ± {scale * se:.2f}"
        if se > 0 and abs(d) > 2 * se:
            text += " *"
    return text


def human(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23 M' (k, M, G, T), 'n/a' for a value no run recorded."""
    if n is None:
        return "n/a"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".strip()
