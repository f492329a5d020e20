"""The report of the token-scaling study (`bash launch/experiment.sh paper-llm-scaling`): OUT/report.md, report.json,
loss.png and routing.png from the run directories OUT/<arm>/seed<N>/.

The question is where, in tokens, an arm's validation loss drops below the dense baseline's. Each run validates on
the same held-out tokens at the same log-spaced iterations (eval_points), so at every validation the per-seed
difference arm - baseline is a paired measurement: its mean and 95% t interval are taken there, and the crossover is
the first token count from which the interval lies below zero at every later validation. Tokens are also given per
non-embedding parameter of the baseline (everything outside the vocabulary matrices, Kaplan et al.'s N), the axis on
which the literature places the point where mixtures of experts start to win. Every number comes from the runs'
files: config.yaml, summary.json and metrics.jsonl (validation records and the routers' diagnostics).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evals.experiment.arms import BASELINE, EXPERIMENTS, ROLES
from evals.experiment.report import HEADER, _tokens_per_s, report_path
from evals.experiment.stats import CONFIDENCE, PairedDifference, interval_text, p_text, paired_difference
from evals.runs import Run, RunGroup, load_group
from evals.scores import Stat, human
from runtime.fsutil import write_text_atomic
from runtime.rundir import run_state

ROUTER_STATS = ("top1_prob", "entropy", "cv")  # per MoE layer in the train records: moe/<layer>/<stat>


@dataclass
class ScalingArm:
    name: str
    what: str
    runs: dict[int, Run]  # seed -> finished run
    role: str | None = None  # its role in the arm table (evals.experiment.arms.ROLES)
    curves: dict[int, dict[int, float]] = field(default_factory=dict)  # seed -> {training tokens: validation loss}
    diffs: dict[int, PairedDifference] = field(default_factory=dict)  # tokens -> arm - baseline over seeds

    @property
    def first(self) -> Run:
        return self.runs[min(self.runs)]

    def summary(self, key: str) -> Any:
        return self.first.summary.get(key)

    def model_text(self) -> str:
        overrides = self.summary("model_overrides") or {}
        text = str(self.summary("model"))
        return text + (" " + json.dumps(overrides, separators=(",", ":")) if overrides else "")

    def final_loss(self) -> dict[int, float]:
        return {seed: curve[max(curve)] for seed, curve in self.curves.items()}


def model_config(run: Run) -> Any:
    from llm.model.presets import load_model_config

    return load_model_config(str(run.summary["model"]), **(run.summary.get("model_overrides") or {}))


def non_embedding_params(run: Run) -> int:
    """Parameters outside the input embedding and the output head (one matrix when they are tied)."""
    from llm.model.flops import account

    config = model_config(run)
    acc = account(config)
    return acc.total_params - acc.embedding_params * (1 if config.tie_word_embeddings else 2)


def routing_text(run: Run) -> str:
    """The routing the run's model trained with, from its own config (preset + overrides as recorded in
    summary.json): the recipe's name (configuration_parameternet_llama.ROUTING_RECIPES), then every setting."""
    from transformers import MixtralConfig

    from llm.model.configuration_parameternet_llama import ParameterNetLlamaConfig, routing_recipe

    config = model_config(run)
    if isinstance(config, MixtralConfig):
        return (
            f"mixtral (transformers' MixtralForCausalLM: raw linear router, softmax, top-{config.num_experts_per_tok} "
            f"renormalised, aux {config.router_aux_loss_coef:g}, no z-loss)"
        )
    if not isinstance(config, ParameterNetLlamaConfig):
        return "dense (no router)"
    return (
        f"{routing_recipe(config)} (router_type {config.router_type}, router_input {config.router_input}, "
        f"score {config.router_score}, gate {config.router_gate}, top-{config.top_k}, "
        f"aux {config.router_aux_loss_coef:g}, z {config.router_z_loss_coef:g}, "
        f"bias rate {config.router_bias_update_rate:g}, capacity {config.capacity_factor})"
    )


def load_scaling_arms(out: Path, experiment: str, names: str | None) -> tuple[list[ScalingArm], list[str]]:
    """The arms with finished runs (the baseline first) and the runs left out, with why."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"--experiment {experiment!r} is not known; known: {', '.join(EXPERIMENTS)}")
    table = {arm.name: arm for arm in EXPERIMENTS[experiment]}
    wanted = [n.strip() for n in names.split(",") if n.strip()] if names else [a.name for a in EXPERIMENTS[experiment]]
    wanted = [BASELINE, *[n for n in wanted if n != BASELINE]]
    arms, left_out = [], []
    for name in wanted:
        if not (out / name).is_dir():
            left_out.append(f"`{name}`: no runs under {out / name}")
            continue
        runs: dict[int, Run] = {}
        for run in load_group(out / name, label=name).runs:
            state = run_state(run.path)
            if not state.finished or run.seed is None:
                left_out.append(f"`{name}/{run.path.name}`: {state.describe() if not state.finished else 'no seed'}")
                continue
            runs[run.seed] = run
        if runs:
            spec = table.get(name)
            arm = ScalingArm(
                name, spec.what if spec else "(not an arm of this experiment)", runs, spec.role if spec else None
            )
            arm.curves = {s: {int(r["tokens"]): float(r["val_loss"]) for r in run.valid} for s, run in runs.items()}
            arms.append(arm)
    if not arms or arms[0].name != BASELINE:
        raise ValueError(f"{out}: no finished {BASELINE} run; every difference is taken against it")
    if len(arms) < 2:
        raise ValueError(f"{out}: no finished run besides {BASELINE}'s; {'; '.join(left_out)}")
    budgets = {(run.summary.get("tokens"), run.summary.get("seq_len")) for arm in arms for run in arm.runs.values()}
    if len(budgets) > 1:
        raise ValueError(f"the runs trained on different token budgets or seq_len ({sorted(budgets)}); pair equal ones")
    base = arms[0]
    for arm in arms[1:]:
        seeds = sorted(set(base.curves) & set(arm.curves))
        shared = set.intersection(*(set(base.curves[s]) & set(arm.curves[s]) for s in seeds)) if seeds else set()
        for tokens in sorted(shared):
            diff = paired_difference(
                {s: base.curves[s][tokens] for s in seeds}, {s: arm.curves[s][tokens] for s in seeds}
            )
            assert diff is not None
            arm.diffs[tokens] = diff
    return arms, left_out


def crossover(diffs: dict[int, PairedDifference]) -> int | None:
    """The first token count from which the interval lies below zero at every later validation (None: never)."""
    found = None
    for tokens in sorted(diffs, reverse=True):
        high = diffs[tokens].high
        if high is None or high >= 0:
            break
        found = tokens
    return found


def crossover_text(arm: ScalingArm, per_param: float) -> str:
    last = max(arm.diffs) if arm.diffs else 0
    point = crossover(arm.diffs)
    if point is None:
        return f"no crossover up to {human(last)} tokens ({last / per_param:.2f} tokens per parameter)"
    return (
        f"crossover at {human(point)} tokens ({point / per_param:.2f} tokens per parameter): below {BASELINE} "
        f"with 95% confidence from there to the end ({human(last)} tokens)"
    )


def router_series(arm: ScalingArm) -> dict[str, dict[int, float]]:
    """stat -> {tokens: mean over MoE layers and seeds} from the train records (empty for a dense arm)."""
    series: dict[str, dict[int, list[float]]] = {stat: {} for stat in ROUTER_STATS}
    for run in arm.runs.values():
        for record in run.train:
            for stat in ROUTER_STATS:
                values = [v for k, v in record.items() if k.startswith("moe/") and k.endswith(f"/{stat}")]
                if values and "tokens" in record:
                    series[stat].setdefault(int(record["tokens"]), []).append(statistics.fmean(values))
    return {stat: {t: statistics.fmean(v) for t, v in points.items()} for stat, points in series.items() if points}


def difference_table(arms: list[ScalingArm], per_param: float) -> str:
    others = arms[1:]
    lines = [
        "| Iteration | Tokens | Tokens / parameter | " + " | ".join(f"{a.name} − {BASELINE}" for a in others) + " |",
        "|---:|---:|---:|" + "---:|" * len(others),
    ]
    iteration = {int(r["tokens"]): int(r["iteration"]) for r in arms[0].first.valid}
    for tokens in sorted(set().union(*(a.diffs for a in others))):
        cells = [interval_text(a.diffs.get(tokens)) for a in others]
        row = f"| {iteration.get(tokens, '')} | {human(tokens)} | {tokens / per_param:.3f} | "
        lines.append(row + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def final_table(arms: list[ScalingArm]) -> str:
    lines = [
        "| Arm | What | Model as trained | Routing | Total / active parameters | Seeds | Final validation loss "
        f"| Δ vs {BASELINE} (paired) [95% t interval] | p | Tokens/s |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for arm in arms:
        loss = Stat.of(list(arm.final_loss().values()))
        last = arm.diffs[max(arm.diffs)] if arm.diffs else None
        speeds = [s for s in (_tokens_per_s(run) for run in arm.runs.values()) if s is not None]
        cells = [
            arm.name,
            arm.what,
            f"`{arm.model_text()}`",
            routing_text(arm.first),
            f"{arm.summary('total_params'):,} / {arm.summary('active_params'):,}",
            ", ".join(str(s) for s in sorted(arm.runs)),
            f"{loss.mean:.4f}" + (f" ± {loss.std:.4f}" if loss.std is not None else ""),
            "(baseline)" if arm is arms[0] else interval_text(last),
            "" if arm is arms[0] else p_text(last),
            f"{statistics.fmean(speeds):,.0f}" if speeds else "n/a",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def router_table(arms: list[ScalingArm]) -> str:
    lines = [
        "| Arm | Tokens | Top-1 probability | Router entropy (nats) | Expert-load CV |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm in arms:
        series = router_series(arm)
        if not series:
            continue
        points = sorted(series["cv"])
        for tokens in sorted({points[0], points[len(points) // 2], points[-1]}):
            cells = [f"{series[s][tokens]:.3f}" if tokens in series.get(s, {}) else "n/a" for s in ROUTER_STATS]
            lines.append(f"| {arm.name} | {human(tokens)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reading(arms: list[ScalingArm], per_param: float) -> str:
    """arms: the baseline first; what each other arm is (headline, control, ceiling) comes from its role."""
    base = arms[0]
    last = max(base.curves[min(base.curves)])
    sentences = [
        f"Every arm read {human(last)} tokens, {last / per_param:.2f} per non-embedding parameter of {base.name} "
        f"({per_param:,.0f})."
    ]
    for arm in arms[1:]:
        final = arm.diffs[max(arm.diffs)] if arm.diffs else None
        sentences.append(
            f"{arm.name}{f' ({ROLES[arm.role]})' if arm.role else ''} ended at {interval_text(final)} nats against "
            f"{base.name} (n = {final.n if final else 0} seeds, p = {p_text(final)}); {crossover_text(arm, per_param)}."
        )
    control = next((arm for arm in arms if arm.role == "control"), None)
    headline = next((arm for arm in arms if arm.role == "headline"), None)
    if control is not None and control.diffs and crossover(control.diffs) is None:
        sentences.append(
            f"The control {control.name} never beat {base.name} with confidence here, so this budget does not show "
            "where a conventional mixture of experts wins: a ParameterNet arm that loses here is not yet evidence "
            "against its design, only against this regime or recipe."
        )
    if control is not None and headline is not None:
        # headline - control, paired by seed at the last validation both have
        seeds = sorted(set(control.curves) & set(headline.curves))
        tokens = max(set.intersection(*(set(control.curves[s]) & set(headline.curves[s]) for s in seeds)), default=None)
        if seeds and tokens is not None:
            diff = paired_difference(
                {s: control.curves[s][tokens] for s in seeds}, {s: headline.curves[s][tokens] for s in seeds}
            )
            sentences.append(
                f"Against the control at {human(tokens)} tokens, {headline.name} − {control.name} = "
                f"{interval_text(diff)} nats (p = {p_text(diff)}): how far ParameterNet's single-projection experts "
                "are from whole-MLP experts at the same active parameters."
            )
    return " ".join(sentences)


def build_markdown(
    arms: list[ScalingArm], left_out: list[str], out: Path, per_param: float, zero_shot_plot: bool = False
) -> str:
    first = arms[0].first
    cfg = first.config
    points = sorted(arms[0].curves[min(arms[0].curves)])
    parts = [
        f"{HEADER}: `{out}` (token scaling)",
        "",
        f"Arms: {len(arms)}; seeds: {', '.join(f'{a.name} {len(a.runs)}' for a in arms)}. Every run trained on corpus "
        f"`{cfg.get('corpus')}` for {human(first.summary.get('tokens'))} tokens ({first.summary.get('iterations')} "
        f"iterations of {cfg.get('global_batch_size')} x {first.summary.get('seq_len')} tokens, LR schedule "
        f"`{cfg.get('lr_decay_style')}`), validated on the same {cfg.get('eval_iters')} x "
        f"{cfg.get('global_batch_size')} x {first.summary.get('seq_len')} held-out tokens at {len(points)} log-spaced "
        f"token counts ({', '.join(human(p) for p in points)}). One seed = one data order shared by every arm.",
        "",
        "## Reading",
        "",
        reading(arms, per_param) + (f" Left out: {'; '.join(left_out)}." if left_out else ""),
        "",
        "## Paired difference to vanilla at every validation",
        "",
        f"Cells: mean of arm − {BASELINE} over seeds (nats) [{100 * CONFIDENCE:.0f}% t interval]; tokens per "
        f"parameter: per non-embedding parameter of {BASELINE}.",
        "",
        difference_table(arms, per_param),
        "![loss](loss.png)",
        "",
        *(
            ["Zero-shot accuracy during training (--eval_tasks):", "", "![zero-shot](zero_shot.png)", ""]
            if zero_shot_plot
            else []
        ),
        "## Final validation loss",
        "",
        final_table(arms),
        "Tokens/s: the median over each run's train records, then the mean over seeds (see results/README.md for how"
        " the runs shared the cores).",
        "",
        "## Routers",
        "",
        "Mean over MoE layers and seeds of each log record: the top-1 router probability, the router's entropy (ln 8 = "
        "2.079 is uniform over 8 experts) and the coefficient of variation of the expert load (0 is balanced, 2.65 is "
        "every token on one of 8 experts; sampling noise alone is about 0.1 at a few thousand tokens per step).",
        "",
        router_table(arms),
        "![routing](routing.png)",
        "",
        "## Sources",
        "",
        "Run directories (relative to this one): "
        + ", ".join(f"`{a.name}/seed{s}`" for a in arms for s in sorted(a.runs))
        + ". `report.json` holds every number above.",
        "",
    ]
    return "\n".join(parts)


def report_data(arms: list[ScalingArm], left_out: list[str], per_param: float) -> dict[str, Any]:
    return {
        "baseline": BASELINE,
        "non_embedding_params": per_param,
        "left_out": left_out,
        "arms": [
            {
                "name": arm.name,
                "what": arm.what,
                "model": arm.model_text(),
                "routing": routing_text(arm.first),
                "total_params": arm.summary("total_params"),
                "active_params": arm.summary("active_params"),
                "curves": arm.curves,
                "diffs": {tokens: asdict(diff) for tokens, diff in arm.diffs.items()},
                "crossover_tokens": crossover(arm.diffs) if arm.diffs else None,
                "router": router_series(arm),
            }
            for arm in arms
        ],
    }


def plot_routing(arms: list[ScalingArm], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evals.plots import save_figure

    fig, axes = plt.subplots(1, len(ROUTER_STATS), figsize=(15, 4.2))
    for arm in arms:
        series = router_series(arm)
        for ax, stat in zip(axes, ROUTER_STATS):
            if stat in series:
                xs = sorted(series[stat])
                ax.plot(xs, [series[stat][x] for x in xs], marker="o", markersize=2, label=arm.name)
    for ax, title in zip(axes, ("top-1 router probability", "router entropy (nats)", "expert-load CV")):
        ax.set_title(title)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    save_figure(fig, path)


def write_scaling_report(out: Path, experiment: str = "paper-llm-scaling", names: str | None = None) -> Path:
    from evals.experiment.plots import plot_experiment_losses
    from evals.plots import plot_zero_shot

    out = Path(out)
    report = report_path(out)
    arms, left_out = load_scaling_arms(out, experiment, names)
    per_param = float(non_embedding_params(arms[0].first))
    curves = {arm.name: {s: {float(t): v for t, v in c.items()} for s, c in arm.curves.items()} for arm in arms}
    plot_experiment_losses(curves, BASELINE, out / "loss.png", log_x=True, per_param=per_param)
    plot_routing(arms, out / "routing.png")
    groups = [RunGroup(arm.name, out / arm.name, [arm.runs[s] for s in sorted(arm.runs)]) for arm in arms]
    during = plot_zero_shot(groups, out / "zero_shot.png")
    write_text_atomic(out / "report.json", json.dumps(report_data(arms, left_out, per_param), indent=2) + "\n")
    write_text_atomic(report, build_markdown(arms, left_out, out, per_param, during))
    return report
