"""The experiment report's loss figure (evals.experiment.report): validation loss per arm with a band of one standard
deviation over seeds, and each arm's paired difference to the baseline with its 95% t interval as the band."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from evals.experiment.stats import difference_curve  # noqa: E402
from evals.plots import fill_std, save_figure  # noqa: E402
from evals.scores import band  # noqa: E402

# arm -> seed -> {training tokens: validation loss}
Curves = dict[str, dict[int, dict[float, float]]]


def plot_experiment_losses(
    curves: Curves, baseline: str, path: Path, log_x: bool = False, per_param: float | None = None
) -> None:
    """log_x: tokens on a log axis (log-spaced validations); per_param: also label the axis in tokens per that many
    parameters (a second axis on top)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (arm, per_seed) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        xs, ys, sd = band(list(per_seed.values()))
        if not xs:
            continue
        label = f"{arm} ({len(per_seed)} seed{'s' if len(per_seed) > 1 else ''})"
        left.plot(xs, ys, color=color, marker="o", markersize=3, linewidth=1.5, label=label)
        fill_std(left, xs, ys, sd, color)
        if arm == baseline:
            continue
        xs, means, lows, highs = difference_curve(curves[baseline], per_seed)
        right.plot(xs, means, color=color, marker="o", markersize=3, linewidth=1.5, label=arm)
        if all(v is not None for v in lows + highs):
            right.fill_between(xs, lows, highs, color=color, alpha=0.15)
    left.set_title("Validation loss (band: ±1 std over seeds)")
    left.set_ylabel("validation cross-entropy")
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_title(f"Paired difference to {baseline} (band: 95% t interval)")
    right.set_ylabel(f"validation loss − {baseline}")
    for ax in (left, right):
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
        if log_x:
            ax.set_xscale("log")
        if per_param:
            top = ax.secondary_xaxis("top", functions=(lambda x: x / per_param, lambda x: x * per_param))
            top.set_xlabel("tokens per non-embedding parameter")
        if ax.has_data():
            ax.legend(fontsize=8)
    save_figure(fig, path)
