"""Expert load over training: a heat map per MoE layer (x: iteration, y: expert, colour: share of assignments) and
the coefficient of variation of the expert counts over time, from a run's metrics.jsonl.

    python -m evals.plot_routing RUN_DIR [--out PNG]

The PNG is a view of metrics.jsonl, so an earlier plot of ours at --out (its PNG text names this tool) is replaced;
any other file there never is (runtime.fsutil.claim_output).

The trainer's train records carry `"expert_counts": [[E ints] per MoE layer]` and `moe/<layer>/...` keys that name
the layers in the same order. A healthy router keeps every share near 1/E and the CV low; an expert that goes dark
(a black row) or one that takes everything (a bright row, high CV) is load-balancing failure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import print_error
from runtime.fsutil import atomic_path, claim_output

TOOL = "evals.plot_routing"
# Plots written before the tool moved from llm/ to evals/ name it so; they are ours too, so replaced as well.
FORMER_TOOLS = ("llm.plot_routing",)


@dataclass
class RoutingHistory:
    iterations: np.ndarray  # [N] sorted, unique
    counts: np.ndarray  # [N, layers, experts]
    layer_names: list[str]
    dropped_tokens: np.ndarray  # [N]

    @property
    def shares(self) -> np.ndarray:
        return self.counts / np.maximum(self.counts.sum(-1, keepdims=True), 1)

    @property
    def cv(self) -> np.ndarray:
        """[N, layers]: std / mean of the per-expert counts (0 = perfectly balanced)."""
        return self.counts.std(-1) / np.maximum(self.counts.mean(-1), 1e-9)


def _layer_names(record: dict, num_layers: int) -> list[str]:
    # The trainer writes moe/<layer>/min_share, max_share, cv per layer, in the order of expert_counts.
    names: list[str] = []
    for key in record:
        if key.startswith("moe/") and key.count("/") >= 2:
            name = key[len("moe/") : key.rindex("/")]
            if name not in names:
                names.append(name)
    return names if len(names) == num_layers else [f"MoE layer {i}" for i in range(num_layers)]


def load_routing(metrics_path: Path) -> RoutingHistory:
    """Train records with expert counts; the last record of each iteration wins (a resumed run logs some twice)."""
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{metrics_path} not found: pass the --output_dir of a training run (it writes metrics.jsonl there "
            f"on rank 0 every --log_interval iterations)"
        )
    by_iteration: dict[int, dict] = {}
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
        if isinstance(record, dict) and record.get("kind") == "train" and "expert_counts" in record:
            by_iteration[int(record["iteration"])] = record
    if not by_iteration:
        raise ValueError(
            f"{metrics_path} has no train records with 'expert_counts': this run has no MoE layers (vanilla LLaMA?) "
            f"or logged no training step yet; plot a ParameterNet run"
        )
    iterations = sorted(by_iteration)
    first = np.asarray(by_iteration[iterations[0]]["expert_counts"], dtype=np.float64)
    if first.ndim != 2 or first.size == 0:
        raise ValueError(
            f"{metrics_path}: iteration {iterations[0]} has expert_counts of shape {first.shape}; expected "
            f"[num_moe_layers][num_experts]"
        )
    counts = []
    for it in iterations:
        c = np.asarray(by_iteration[it]["expert_counts"], dtype=np.float64)
        if c.shape != first.shape:
            raise ValueError(
                f"{metrics_path}: iteration {it} has expert_counts of shape {c.shape} but iteration {iterations[0]} "
                f"has {first.shape}; the file mixes runs of different models, write each run to its own output_dir"
            )
        counts.append(c)
    return RoutingHistory(
        iterations=np.asarray(iterations),
        counts=np.stack(counts),
        layer_names=_layer_names(by_iteration[iterations[0]], first.shape[0]),
        dropped_tokens=np.asarray([by_iteration[it].get("dropped_tokens", 0) for it in iterations]),
    )


def _edges(iterations: np.ndarray) -> np.ndarray:
    """Cell edges around each logged iteration (logging intervals may differ, e.g. after a resume)."""
    if len(iterations) == 1:
        return np.asarray([iterations[0] - 0.5, iterations[0] + 0.5])
    mid = (iterations[1:] + iterations[:-1]) / 2
    return np.concatenate([[2 * iterations[0] - mid[0]], mid, [2 * iterations[-1] - mid[-1]]])


def plot_routing(run_dir: Path, out: Path | None = None) -> Path:
    """Write the PNG (atomically) and return its path; default RUN_DIR/routing.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist; pass a training run's --output_dir")
    history = load_routing(run_dir / "metrics.jsonl")
    out = out or run_dir / "routing.png"
    claim_output(out, overwrite=True, flag="--out", tool=TOOL, proof=out, files=[out], owned=_is_our_plot(out))
    num_layers, num_experts = history.counts.shape[1:]
    cols = min(num_layers, 4)
    rows = math.ceil(num_layers / cols)
    fig = plt.figure(figsize=(4.2 * cols, 2.6 * rows + 2.8), layout="constrained")
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1.0] * rows + [1.1])
    x_edges = _edges(history.iterations.astype(np.float64))
    y_edges = np.arange(num_experts + 1) - 0.5
    shares = history.shares
    vmax = max(float(shares.max()), 1.0 / num_experts)
    mesh = None
    for i, name in enumerate(history.layer_names):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        mesh = ax.pcolormesh(x_edges, y_edges, shares[:, i, :].T, cmap="magma", vmin=0.0, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("expert")
        ax.set_yticks(range(num_experts) if num_experts <= 16 else np.linspace(0, num_experts - 1, 9).round())
        ax.set_xlabel("iteration")
    fig.colorbar(mesh, ax=fig.axes, label=f"share of assignments (uniform = 1/{num_experts})", shrink=0.9)

    ax = fig.add_subplot(grid[rows, :])
    cv = history.cv
    for i, name in enumerate(history.layer_names):
        ax.plot(history.iterations, cv[:, i], marker="." if len(history.iterations) < 50 else None, label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("CV of expert counts")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if num_layers <= 12:
        ax.legend(fontsize=7, ncol=min(num_layers, 4))
    dropped = int(history.dropped_tokens.sum())
    ax.set_title(
        f"load imbalance over training (0 = balanced); dropped assignments (sum over the records): {dropped}",
        fontsize=9,
    )
    fig.suptitle(f"Expert load: {run_dir.name} ({num_layers} MoE layers x {num_experts} experts)")

    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=110, metadata={"Software": TOOL})
    finally:
        plt.close(fig)
    return out


def _is_our_plot(path: Path) -> bool:
    """A PNG that this tool wrote (savefig records the tool in the PNG's Software text)."""
    if not path.is_file():
        return False
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.text.get("Software") in (TOOL, *FORMER_TOOLS)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.plot_routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a training run's --output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default RUN_DIR/routing.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_routing(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print_error(str(exc))
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
