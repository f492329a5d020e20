"""The one-paragraph reading of an experiment report, generated from its numbers (never a fixed sentence): whether
the headline's paired difference is significant, from when on the gap was stable, how much of the ceiling's gain the
free parameters reach, what the ablations show, and what the zero-shot accuracies can and cannot say. Which arm is the
headline, the ceiling or in an ablation group comes from the experiment's arm table (Arm.role, Arm.ablations)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from evals.experiment.arms import Arm, ArmResult, role
from evals.experiment.stats import PairedDifference, difference_curve, interval_text, p_text
from evals.scores import human


def _verdict(diff: PairedDifference) -> str:
    if diff.n < 2:
        return "one seed, so no interval: nothing can be concluded from it (run 3 or more seeds)"
    if diff.excludes_zero:
        return "the 95% interval excludes 0: significant at the 5% level"
    return "the 95% interval includes 0: not significant at the 5% level, the arms cannot be told apart here"


def _ratio(arm: ArmResult, base: ArmResult, key: str) -> float | None:
    a, b = arm.summary_value(key), base.summary_value(key)
    return a / b if a is not None and b else None


def _headline(head: ArmResult, base: ArmResult) -> list[str]:
    d = head.loss_diff
    assert d is not None
    direction = "lower" if d.mean < 0 else "higher" if d.mean > 0 else "the same"
    text = (
        f"ParameterNet ({head.name}) ended with a {direction} final validation loss than {base.name}: "
        f"{interval_text(d)} nats (mean paired difference over {d.n} seed{'s' if d.n > 1 else ''}"
    )
    text += f" [95% t interval], paired t-test p = {p_text(d)}); {_verdict(d)}." if d.n > 1 else f"); {_verdict(d)}."
    params, flops = _ratio(head, base, "total_params"), _ratio(head, base, "flops_per_token")
    if params is not None and flops is not None:
        text += f" It has {params:.2f}x the parameters at {flops:.4f}x the forward FLOPs per token."
    return [text, *_stability(head, base)]


def _stability(head: ArmResult, base: ArmResult) -> list[str]:
    """From which validation on the headline interval stayed on one side of 0 (the gap was stable)."""
    xs, means, lows, highs = difference_curve(base.curves, head.curves)
    if len(xs) < 2 or any(v is None for v in lows + highs):
        return []
    final_sign = math.copysign(1.0, means[-1])
    first = len(xs)
    for i in range(len(xs) - 1, -1, -1):
        low, high = lows[i], highs[i]
        assert low is not None and high is not None
        if (final_sign < 0 and high < 0) or (final_sign > 0 and low > 0):
            first = i
        else:
            break
    if first == len(xs):
        return [f"At the last validation the interval of the difference still included 0 ({len(xs)} validations)."]
    return [
        f"The interval has excluded 0, on the same side, at every validation from {human(xs[first])} training tokens "
        f"on ({len(xs) - first} of {len(xs)} validations): the gap is {'stable' if len(xs) - first >= 2 else 'new'}."
    ]


def _ceiling(head: ArmResult, wide: ArmResult, base: ArmResult) -> list[str]:
    dw, dh = wide.loss_diff, head.loss_diff
    assert dw is not None and dh is not None
    flops = _ratio(wide, base, "flops_per_token")
    params = _ratio(wide, head, "total_params")
    what = f"The ceiling {wide.name} ("
    what += f"{params:.4f}x {head.name}'s parameters, " if params is not None else ""
    what += f"{flops:.2f}x {base.name}'s FLOPs per token)" if flops is not None else "more FLOPs per token)"
    what += f" reached {interval_text(dw)} against {base.name}"
    if dw.mean < 0 and dh.mean > 0:
        return [f"{what}; {head.name} reaches none of that gain: its loss is above {base.name}'s."]
    if dw.mean < 0:
        return [f"{what}; {head.name}'s difference is {100 * dh.mean / dw.mean:.0f}% of the ceiling's gain."]
    return [f"{what}: no gain, so at this budget there is no ceiling for the free parameters to approach."]


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # the SwiGLU MLP's order, the order the ablation is listed in


def _group(table: Sequence[Arm], by: dict[str, ArmResult], name: str) -> list[tuple[Arm, ArmResult]]:
    """The arms of ablation group `name` (Arm.ablations) with a paired difference, by projection, then experts."""
    arms = [(a, by[a.name]) for a in table if name in a.ablations and a.name in by and by[a.name].loss_diff is not None]
    projection = PROJECTIONS.index
    return sorted(arms, key=lambda p: (projection(p[0].overrides["moe_projections"][0]), p[0].overrides["num_experts"]))


def _ablations(table: Sequence[Arm], by: dict[str, ArmResult], base: ArmResult, head: ArmResult) -> list[str]:
    out = []
    projections = _group(table, by, "projection")  # the same experts on each projection (the paper's Table 7)
    counts = _group(table, by, "experts")  # the number of experts on one projection
    if len(projections) >= 2:
        best = min((a for _, a in projections), key=lambda a: statistics.fmean(a.loss.values()))
        listing = "; ".join(f"{a.name} {interval_text(a.loss_diff)}" for _, a in projections)
        text = f"Which projection gets the experts (differences to {base.name}, 95% intervals): {listing}; the lowest "
        text += f"mean loss is {best.name}'s."
        others = [spec for spec, a in counts if a is not head]
        if best is not head and others:
            where = others[0].overrides["moe_projections"][0]
            experts = "- and ".join(str(spec.overrides["num_experts"]) for spec in others)
            text += f" The {experts}-expert arm{'s' * (len(others) > 1)} ran on {where}, not on {best.name}: a "
            text += "follow-up there is the test."
        out.append(text)
    if len(counts) >= 2:
        means = [statistics.fmean(a.loss.values()) for _, a in counts]
        listing = "; ".join(
            f"{spec.overrides['num_experts']} experts {interval_text(a.loss_diff)}" for spec, a in counts
        )
        monotone = all(later < earlier for earlier, later in zip(means, means[1:]))
        where = counts[0][0].overrides["moe_projections"][0]
        text = f"Experts on {where}: {listing}; the mean loss {'falls' if monotone else 'does not fall'} "
        out.append(text + "steadily with the number of experts.")
    comparisons = sum(1 for a in by.values() if a.loss_diff is not None and a is not head)
    if comparisons:
        out.append(
            f"These {comparisons} ablation intervals are per comparison, not corrected for multiplicity: "
            "exploratory, unlike the headline, which was fixed in advance."
        )
    return out


def _accuracy(head: ArmResult, base: ArmResult, tasks: list[str], limit: Any) -> list[str]:
    a = head.accuracy_diff
    if a is None:
        return []
    docs = f"{limit:g} documents each" if isinstance(limit, (int, float)) else "every document"
    text = (
        f"On zero-shot accuracy (the average of {len(tasks)} task{'s' if len(tasks) > 1 else ''}, {docs}) "
        f"{head.name} − {base.name} is {interval_text(a, 100, 2)} points; {_verdict(a)}."
    )
    if isinstance(limit, (int, float)) and limit >= 1:
        text += (
            f" With {limit:g} documents one task's accuracy has a binomial standard error of up to "
            f"{100 * 0.5 / math.sqrt(limit):.1f} points, so models this small, near chance, rarely separate there."
        )
    return [text]


def reading(arms: list[ArmResult], tasks: list[str], limit: Any, table: Sequence[Arm]) -> str:
    """arms: the baseline first; table: the experiment's arms (evals.experiment.arms), whose roles say which is what."""
    by = {arm.name: arm for arm in arms}
    base = arms[0]
    headline = role(table, "headline")
    head = by.get(headline.name) if headline is not None else None
    if head is None or head.loss_diff is None:
        return (
            f"The headline arm {headline.name if headline else '(none in this experiment)'} has no finished, "
            f"evaluated run paired by seed with {base.name}, so this report does not answer the question; the tables "
            "below show what there is."
        )
    sentences = _headline(head, base)
    ceiling = role(table, "ceiling")
    wide = by.get(ceiling.name) if ceiling is not None else None
    if wide is not None and wide.loss_diff is not None:
        sentences += _ceiling(head, wide, base)
    sentences += _ablations(table, by, base, head)
    sentences += _accuracy(head, base, tasks, limit)
    return " ".join(sentences)
