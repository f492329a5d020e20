"""The report of an experiment (launch/experiment.sh, `python -m evals.experiment report OUT`): OUT/report.md,
OUT/report.json, OUT/loss.png and OUT/accuracy.png from the run directories OUT/<arm>/seed<N>/.

Every number comes from the runs' own files, read with evals.runs and evals.results: final validation loss,
parameters, active parameters, FLOPs per token and tokens from summary.json; validation curves and tokens/s from
metrics.jsonl; zero-shot accuracy from the evaluation evals.compare would choose in eval/results/. A run that has not
finished (no summary.json) or has not been evaluated is left out and listed. Paired differences are taken per seed
against the baseline arm (evals.experiment.stats); the reading paragraph is generated from those numbers.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from evals.compare import check_comparable, choose_evaluations, group_scores
from evals.experiment.arms import BASELINE, EXPERIMENTS, Arm, ArmResult
from evals.experiment.reading import reading
from evals.experiment.stats import CONFIDENCE, interval_text, p_text, paired_difference
from evals.results import load_evaluations
from evals.runs import Run, RunGroup, load_group, stale_evaluation
from evals.scores import AVERAGE, Stat, human, stat_text
from runtime.fsutil import write_text_atomic
from runtime.rundir import run_state

HEADER = "# ParameterNet experiment"  # the first line of every report.md we write: proof we may replace it


def _arm_names(out: Path, experiment: str, names: str | None) -> list[str]:
    if experiment not in EXPERIMENTS:
        raise ValueError(f"--experiment {experiment!r} is not known; known: {', '.join(EXPERIMENTS)}")
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
    else:
        wanted = [arm.name for arm in EXPERIMENTS[experiment] if (out / arm.name).is_dir()]
    if BASELINE in wanted:  # the baseline first: the tables' first column and every difference's reference
        wanted = [BASELINE, *[n for n in wanted if n != BASELINE]]
    else:
        raise ValueError(f"{out}: no {BASELINE!r} arm (OUT/{BASELINE}/seed<N>/): every difference is taken against it")
    if len(wanted) < 2:
        raise ValueError(f"{out}: only {', '.join(wanted)}; an experiment report needs {BASELINE} and another arm")
    return wanted


def _usable(run: Run) -> str | None:
    """Why a run cannot be reported yet (None: it can)."""
    state = run_state(run.path)
    if not state.finished:
        return state.describe()
    if run.final_val_loss is None or "total_params" not in run.summary:
        return "not finished (no summary.json with final_val_loss)"
    if run.seed is None:
        return "no seed in summary.json"
    evaluations = load_evaluations(run.eval_dir)
    if not evaluations:
        return f"not evaluated (nothing in {run.eval_dir})"
    stale = stale_evaluation(run, [e.step for e in evaluations])
    if stale is not None:
        return f"not evaluated at its final iteration {run.final_iteration} ({stale.split(': ', 1)[0]})"
    return None


def load_arms(out: Path, experiment: str, names: str | None) -> tuple[list[RunGroup], list[str]]:
    """The groups of reportable runs (one per arm with any) and the runs left out, with why."""
    groups, left_out = [], []
    for name in _arm_names(out, experiment, names):
        group = load_group(out / name, label=name)
        usable = []
        for run in group.runs:
            why = _usable(run)
            if why is None:
                usable.append(run)
            else:
                left_out.append(f"`{_relative(run.path, out)}`: {why}")
        seeds = [run.seed for run in usable]
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"{out / name}: two runs with the same seed ({sorted(seeds)}); keep one per seed")
        if usable:
            groups.append(RunGroup(name, group.path, usable))
        elif name == BASELINE:
            raise ValueError(f"{out / name}: no finished and evaluated {BASELINE} run; {'; '.join(left_out)}")
    if len(groups) < 2:
        raise ValueError(f"{out}: no finished and evaluated run besides {BASELINE}'s; {'; '.join(left_out)}")
    budgets = {(run.summary.get("tokens"), run.summary.get("seq_len")) for g in groups for run in g.runs}
    if len(budgets) > 1:
        runs = "; ".join(f"{run.path}: {run.summary.get('tokens')} tokens" for g in groups for run in g.runs)
        raise ValueError(f"the runs trained on different token budgets or seq_len ({runs}); pair equal budgets only")
    return groups, left_out


def _tokens_per_s(run: Run) -> float | None:
    """The median over the run's train records (the first interval also holds the start-up)."""
    values = [float(r["tokens_per_s"]) for r in run.train if isinstance(r.get("tokens_per_s"), (int, float))]
    return statistics.median(values) if values else None


def _by_seed(group: RunGroup, values: list[float | None]) -> dict[int, float]:
    return {run.seed: v for run, v in zip(group.runs, values) if run.seed is not None and v is not None}


def collect(out: Path, experiment: str, names: str | None) -> tuple[list[ArmResult], list[str], list[str], Any]:
    """(arms, tasks, runs left out, documents per task)."""
    groups, left_out = load_arms(out, experiment, names)
    chosen = choose_evaluations(groups)
    tasks, limit = check_comparable(groups, chosen)
    what = {arm.name: arm.what for arm in EXPERIMENTS[experiment]}
    arms = []
    for group in groups:
        scores = group_scores(group, tasks, chosen)
        seeded = [run for run in group.runs if run.seed is not None]
        arms.append(
            ArmResult(
                name=group.label,
                what=what.get(group.label, "(not an arm of this experiment)"),
                group=group,
                scores=scores,
                loss=_by_seed(group, [run.final_val_loss for run in group.runs]),
                accuracy=_by_seed(group, [row[AVERAGE] for row in scores.per_seed]),
                tokens_per_s=_by_seed(group, [_tokens_per_s(run) for run in group.runs]),
                curves={
                    run.seed: {float(r["tokens"]): float(r["val_loss"]) for r in run.valid if "tokens" in r}
                    for run in seeded
                },
                evaluations={run.seed: chosen[run.path].path for run in seeded},
            )
        )
    base = arms[0]
    for arm in arms[1:]:
        arm.loss_diff = paired_difference(base.loss, arm.loss)
        arm.accuracy_diff = paired_difference(base.accuracy, arm.accuracy)
    return arms, tasks, left_out, limit


def _loss_stat(arm: ArmResult) -> str:
    stat = Stat.of(list(arm.loss.values()))
    return f"{stat.mean:.4f}" + (f" ± {stat.std:.4f}" if stat.std is not None else "")


def loss_table(arms: list[ArmResult]) -> str:
    lines = [
        "| Arm | What | Model as trained | Seeds | Final validation loss "
        f"| Δ vs {BASELINE} (paired) [95% t interval] | p |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for arm in arms:
        seeds = ", ".join(str(s) for s in sorted(arm.loss))
        diff = "(baseline)" if arm is arms[0] else interval_text(arm.loss_diff)
        p = "" if arm is arms[0] else p_text(arm.loss_diff)
        lines.append(f"| {arm.name} | {arm.what} | `{arm.model}` | {seeds} | {_loss_stat(arm)} | {diff} | {p} |")
    return "\n".join(lines) + "\n"


def accuracy_table(arms: list[ArmResult], tasks: list[str]) -> str:
    header = ["Task", "Metric", *[arm.name for arm in arms]]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(arms)]
    for name in [*tasks, AVERAGE]:
        cells = [stat_text(arm.scores.per_task[name]) for arm in arms]
        lines.append(f"| {name} | {arms[0].scores.metrics.get(name, '')} | " + " | ".join(cells) + " |")
    diffs = ["(baseline)", *[interval_text(arm.accuracy_diff, 100, 2) for arm in arms[1:]]]
    lines.append(f"| Δ {AVERAGE} vs {BASELINE} (paired) [95% t interval] | | " + " | ".join(diffs) + " |")
    return "\n".join(lines) + "\n"


def cost_table(arms: list[ArmResult]) -> str:
    base = arms[0]

    def ratio(arm: ArmResult, key: str) -> str:
        a, b = arm.summary_value(key), base.summary_value(key)
        return f"{a / b:.4f}x" if a is not None and b else "n/a"

    def speed(arm: ArmResult) -> str:
        stat = Stat.of(list(arm.tokens_per_s.values())) if arm.tokens_per_s else None
        if stat is None:
            return "n/a"
        return f"{stat.mean:,.0f}" + (f" ± {stat.std:,.0f}" if stat.std is not None else "")

    lines = [
        "| Arm | Total parameters | Active parameters | Forward FLOPs / token | Parameters vs "
        f"{BASELINE} | FLOPs vs {BASELINE} | Training tokens | Tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in arms:
        cells = [
            f"{arm.summary_value('total_params') or 0:,.0f}",
            f"{arm.summary_value('active_params') or 0:,.0f}",
            human(arm.summary_value("flops_per_token"), "FLOP"),
            ratio(arm, "total_params"),
            ratio(arm, "flops_per_token"),
            human(arm.summary_value("tokens")),
            speed(arm),
        ]
        lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def runs_table(arms: list[ArmResult], out: Path) -> str:
    lines = [
        "| Arm | Seed | Final validation loss | Average accuracy (%) | Tokens/s | Run directory "
        "| Evaluation reported |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for arm in arms:
        for run in sorted(arm.group.runs, key=lambda r: r.seed or 0):
            seed = run.seed
            assert seed is not None  # _usable left out runs without one
            speed = arm.tokens_per_s.get(seed)
            cells = [
                f"{arm.loss[seed]:.4f}",
                f"{100 * arm.accuracy[seed]:.2f}",
                "n/a" if speed is None else f"{speed:,.0f}",
                f"`{_relative(run.path, out)}`",
                f"`{_relative(arm.evaluations[seed], out)}`",
            ]
            lines.append(f"| {arm.name} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _relative(path: Path, out: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def _corpus(run: Run) -> str:
    corpus = run.config.get("corpus")
    if corpus:
        return f"corpus `{corpus}`"
    data = run.config.get("data_path") or []
    return f"data `{' '.join(map(str, data))}`" if data else "the embedded default corpus (llm.data.corpus)"


def _left_out_sentence(left_out: list[str]) -> str:
    """The reading names the runs it could not count (an unfinished one among them), not only the list below."""
    if not left_out:
        return ""
    return f" Not counted anywhere in this report ({len(left_out)}): " + "; ".join(left_out) + "."


def build_markdown(
    arms: list[ArmResult],
    tasks: list[str],
    left_out: list[str],
    limit: Any,
    out: Path,
    table: Sequence[Arm],
    zero_shot_plot: bool = False,
) -> str:
    first = arms[0].group.runs[0]
    cfg = first.config
    docs = f"{limit:g} documents per task" if isinstance(limit, (int, float)) else "every document"
    setup = (
        f"Arms: {len(arms)}; seeds per arm: {', '.join(f'{a.name} {len(a.loss)}' for a in arms)}. Every run trained "
        f"on {_corpus(first)} for {human(first.summary.get('tokens'))} tokens ({first.summary.get('iterations')} "
        f"iterations of {cfg.get('global_batch_size')} x {first.summary.get('seq_len')} tokens), one seed = one "
        f"data order shared by every arm. Zero-shot: lm-evaluation-harness, 0-shot, {', '.join(tasks)}, {docs}; "
        "metric acc_norm where lm-eval defines it, else acc."
    )
    parts = [
        f"{HEADER}: `{out}`",
        "",
        setup,
        "",
        "## Reading",
        "",
        reading(arms, tasks, limit, table) + _left_out_sentence(left_out),
        "",
        "## Final validation loss",
        "",
        loss_table(arms),
        "![loss](loss.png)",
        "",
        *(
            ["Zero-shot accuracy during training (--eval_tasks):", "", "![zero-shot](zero_shot.png)", ""]
            if zero_shot_plot
            else []
        ),
        "## Zero-shot accuracy (%)",
        "",
        "Cells: mean ± standard deviation over seeds.",
        "",
        accuracy_table(arms, tasks),
        "![accuracy](accuracy.png)",
        "",
        "## Parameters, FLOPs and speed",
        "",
        "Tokens/s: the median over a run's train records (metrics.jsonl), then mean ± std over seeds.",
        "",
        cost_table(arms),
        "## Method and sources",
        "",
        f"Δ columns: the paired difference arm − {BASELINE} per seed (same seed, same data order), its mean and the "
        f"{100 * CONFIDENCE:.0f}% Student t interval mean ± t(0.975, n−1) · sd/√n over the n seeds both arms have; p "
        "is the two-sided paired t-test. Every number comes from the files below (paths relative to this "
        "directory): final validation loss, parameters, FLOPs and tokens from each run's `summary.json`, the "
        "curves and tokens/s from its `metrics.jsonl`, accuracy from the evaluation named (lm-eval's JSON, chosen "
        "as evals.compare chooses); `report.json` holds the same numbers.",
        "",
        runs_table(arms, out),
    ]
    if left_out:
        parts += ["Left out (not counted anywhere above):", "", *[f"- {why}" for why in left_out], ""]
    return "\n".join(parts)


def report_data(arms: list[ArmResult], tasks: list[str], left_out: list[str], limit: Any) -> dict[str, Any]:
    return {
        "baseline": BASELINE,
        "tasks": tasks,
        "limit": limit,
        "left_out": left_out,
        "arms": [
            {
                "name": arm.name,
                "what": arm.what,
                "model": arm.model,
                "runs": {seed: str(run.path) for seed, run in ((r.seed, r) for r in arm.group.runs)},
                "evaluations": {seed: str(path) for seed, path in arm.evaluations.items()},
                "final_val_loss": arm.loss,
                "average_accuracy": arm.accuracy,
                "accuracy": {name: asdict(stat) for name, stat in arm.scores.per_task.items()},
                "tokens_per_s": arm.tokens_per_s,
                "loss_diff": None if arm.loss_diff is None else asdict(arm.loss_diff),
                "accuracy_diff": None if arm.accuracy_diff is None else asdict(arm.accuracy_diff),
                **{key: arm.summary_value(key) for key in ("total_params", "active_params", "flops_per_token")},
                "tokens": arm.summary_value("tokens"),
            }
            for arm in arms
        ],
    }


def report_path(out: Path, header: str = HEADER) -> Path:
    """OUT/report.md, once OUT is an experiment directory and any report.md there is one we wrote (its first line is
    `header`): never someone else's report.md is replaced."""
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such experiment directory (OUT/<arm>/seed<N>/ run directories)")
    path = out / "report.md"
    if path.is_file() and not path.read_text(encoding="utf-8").startswith(header):
        raise ValueError(f"{path} exists and was not written by evals.experiment; move it away first")
    return path


def write_report(out: Path, experiment: str = "paper-llm", names: str | None = None) -> Path:
    """Writes OUT/report.md, report.json, loss.png and accuracy.png; returns the report's path."""
    from evals.experiment.plots import plot_experiment_losses
    from evals.plots import plot_accuracy, plot_zero_shot

    out = Path(out)
    path = report_path(out)
    arms, tasks, left_out, limit = collect(out, experiment, names)
    plot_experiment_losses({arm.name: arm.curves for arm in arms}, BASELINE, out / "loss.png")
    plot_accuracy([arm.scores for arm in arms], tasks, out / "accuracy.png")
    during = plot_zero_shot([arm.group for arm in arms], out / "zero_shot.png")
    write_text_atomic(out / "report.json", json.dumps(report_data(arms, tasks, left_out, limit), indent=2) + "\n")
    write_text_atomic(path, build_markdown(arms, tasks, left_out, limit, out, EXPERIMENTS[experiment], during))
    return path
