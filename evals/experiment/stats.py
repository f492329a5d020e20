"""The statistics of an experiment report (evals.experiment.report): paired differences over seeds.

Arm A and arm B trained with the same seed see the same data in the same order (the sample order is a pure function
of the seed), so the run-to-run noise they share cancels in the per-seed difference d_s = B_s - A_s. The mean of the
n differences gets Student's t interval with n - 1 degrees of freedom, mean +- t(0.975, n-1) * sd / sqrt(n), and the
two-sided paired t-test's p-value, both from scipy.stats.ttest_rel. Nothing here assumes more than the differences
being independent over seeds and roughly normal; with 3 seeds t(0.975, 2) = 4.30, so only differences large against
their spread come out significant.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass

from scipy import stats as scipy_stats

from evals.scores import common_x

CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedDifference:
    """B - A over the seeds both arms have: per-seed values, their mean and sample std, the t interval, p."""

    seeds: tuple[int, ...]
    per_seed: tuple[float, ...]  # B_s - A_s, in seed order
    mean: float
    std: float | None  # sample standard deviation of the differences (None for one seed)
    low: float | None  # the CONFIDENCE t interval of the mean difference (None for one seed)
    high: float | None
    p_value: float | None  # two-sided paired t-test; None for one seed, or when every difference is equal

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def excludes_zero(self) -> bool | None:
        """Whether the interval lies on one side of 0 (None: no interval with one seed)."""
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0


def paired_difference(
    baseline: dict[int, float], other: dict[int, float], confidence: float = CONFIDENCE
) -> PairedDifference | None:
    """other - baseline, paired by seed (keys); None when they share no seed."""
    seeds = tuple(sorted(set(baseline) & set(other)))
    if not seeds:
        return None
    diffs = tuple(other[s] - baseline[s] for s in seeds)
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(seeds, diffs, mean, None, None, None, None)
    std = statistics.stdev(diffs)
    if std == 0:  # every difference equal: an interval of zero width, and no test (scipy: t = +-inf or nan)
        return PairedDifference(seeds, diffs, mean, std, mean, mean, None)
    with warnings.catch_warnings():  # differences nearly equal: scipy warns of precision loss, p is ~0 all the same
        warnings.simplefilter("ignore", RuntimeWarning)
        test = scipy_stats.ttest_rel([other[s] for s in seeds], [baseline[s] for s in seeds])
        interval = test.confidence_interval(confidence_level=confidence)
    return PairedDifference(seeds, diffs, mean, std, float(interval.low), float(interval.high), float(test.pvalue))


def interval_text(diff: PairedDifference | None, scale: float = 1.0, digits: int = 4) -> str:
    """'+0.0123 [+0.0050, +0.0196]' (the mean difference and its interval, times `scale`); 'n/a' without a pair."""
    if diff is None:
        return "n/a"
    text = f"{scale * diff.mean:+.{digits}f}"
    if diff.low is not None and diff.high is not None:
        text += f" [{scale * diff.low:+.{digits}f}, {scale * diff.high:+.{digits}f}]"
    return text


def p_text(diff: PairedDifference | None) -> str:
    if diff is None or diff.p_value is None:
        return "n/a"
    return f"{diff.p_value:.3g}"


def difference_curve(
    baseline: dict[int, dict[float, float]], other: dict[int, dict[float, float]]
) -> tuple[list[float], list[float], list[float | None], list[float | None]]:
    """xs, mean paired difference other - baseline and its 95% t interval at every x both arms' shared seeds have."""
    seeds = sorted(set(baseline) & set(other))
    xs = common_x([baseline[s] for s in seeds] + [other[s] for s in seeds])
    means: list[float] = []
    lows: list[float | None] = []
    highs: list[float | None] = []
    for x in xs:
        diff = paired_difference({s: baseline[s][x] for s in seeds}, {s: other[s][x] for s in seeds})
        assert diff is not None  # seeds is not empty when xs is not
        means.append(diff.mean)
        lows.append(diff.low)
        highs.append(diff.high)
    return xs, means, lows, highs
