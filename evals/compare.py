"""Side-by-side report of two or more training runs: LLM runs (zero-shot accuracy, parameters, FLOPs, validation
loss) or vision runs (top-1 / top-5, parameters, MACs, validation loss, speed; evals.vision_report).

    python -m evals.compare OUT/llama OUT/parameternet [OUT/more ...] [--out OUT/compare] [--evaluate --limit 50]
    python -m evals.compare runs/vision/demo/parameternet_tiny runs/vision/demo/ghostnet_tiny --out DIR

Each RUN is a run directory, or a directory of run directories that differ only in the seed (one column, reported
as mean +- standard deviation over seeds). The first RUN is the baseline: every other column gets a delta against it.
All runs are of one task (summary.json "task"): LLM and vision runs are never mixed.
Writes report.md, results.json, accuracy.png and loss.png to --out, and prints the accuracy table (vision: and the
model table).
LLM: each run contributes the evaluation (of those kept in RUN/eval/results/, see evals.results) whose task set and
limit every run shares, the largest such, at the run's latest evaluated step. Vision: the final top-1 / top-5 of
summary.json (vision.train evaluates; --evaluate is refused). --out is replaced only when it holds an earlier report
(parameternet_compare.json lists its files), never another directory.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from evals.results import Evaluation, TaskScore, best, load_evaluations, task_scores
from evals.runs import VISION, Run, RunGroup, check_one_task, load_group, stale_evaluation, unfinished_runs
from evals.scores import AVERAGE, GroupScores, Stat, delta, delta_text, human, stat_text
from evals.vision_report import build_vision_report, check_vision_runs
from evals.zero_shot import parse_batch_size
from runtime.errors import print_error
from runtime.fsutil import claim_output, publish_dir, temp_dir_for, write_owner, write_text_atomic

TOOL = "evals.compare"
REPORT_META = "parameternet_compare.json"  # proves --out holds our report (and lists its files)


Chosen = dict[Path, Evaluation]  # run directory -> the evaluation reported for it


def _scores_of(run: Run, chosen: Chosen) -> list[TaskScore]:
    evaluation = chosen[run.path]
    return task_scores(evaluation.results, str(evaluation.path))


def _limit_order(limit: float | None) -> float:
    return math.inf if limit is None else limit


def choose_evaluations(groups: list[RunGroup]) -> Chosen:
    """For every run, the evaluation to report: of the (tasks, limit) pairs that every run was evaluated on, the one
    with the most tasks, then the largest limit; of a run's evaluations with that pair, the latest step (then the
    newest). A quick check on a few tasks therefore never displaces the suite."""
    runs = [run for group in groups for run in group.runs]
    if not runs:
        raise ValueError("no runs to compare")
    found = {run.path: load_evaluations(run.eval_dir) for run in runs}
    for run in runs:
        if not found[run.path]:
            raise FileNotFoundError(
                f"{run.path} has not been evaluated (no {run.results_path}); run "
                f"`python -m evals.zero_shot --model {run.path}` first, or pass --evaluate"
            )
        stale = stale_evaluation(run, [e.step for e in found[run.path]])
        if stale is not None:
            raise ValueError(stale)
        # Only evaluations of the final weights (or of an unknown step) are paired with the final loss.
        final = run.final_iteration
        found[run.path] = [e for e in found[run.path] if final is None or e.step is None or e.step == final]
    ref = runs[0]
    common = {(e.tasks, e.limit) for e in found[ref.path]}
    for run in runs[1:]:
        mine = {(e.tasks, e.limit) for e in found[run.path]}
        if not common & mine:
            a, b = best(found[run.path]), best(found[ref.path])
            if {e.tasks for e in found[run.path]} & {e.tasks for e in found[ref.path]}:
                raise ValueError(
                    f"{run.path} was evaluated with limit={a.limit} but {ref.path} with limit={b.limit} on the same "
                    f"tasks; evaluate all runs with the same --limit"
                )
            raise ValueError(
                f"{run.path} was evaluated on tasks {sorted(a.tasks)} but {ref.path} on {sorted(b.tasks)}; "
                "evaluate all runs on the same --tasks"
            )
        common &= mine
    pair = max(common, key=lambda p: (len(p[0]), _limit_order(p[1])))
    chosen = {}
    for path, evaluations in found.items():
        matching = [e for e in evaluations if (e.tasks, e.limit) == pair]
        chosen[path] = max(matching, key=lambda e: (-1 if e.step is None else e.step, e.evaluated_at))
    return chosen


def check_comparable(groups: list[RunGroup], chosen: Chosen) -> tuple[list[str], Any]:
    """The common task list and limit; refuses runs whose chosen evaluations counted different documents."""
    reference: tuple[Run, dict[str, int], Any] | None = None
    for group in groups:
        for run in group.runs:
            evaluation = chosen[run.path]
            samples = {s.name: s.samples for s in _scores_of(run, chosen)}
            limit = evaluation.results.get("config", {}).get("limit")
            if reference is None:
                reference = (run, samples, limit)
                continue
            ref_run, ref_samples, ref_limit = reference
            if samples != ref_samples or limit != ref_limit:
                raise ValueError(
                    f"{run.path} was evaluated with limit={limit} ({samples}) but {ref_run.path} with "
                    f"limit={ref_limit} ({ref_samples}); evaluate all runs with the same --limit"
                )
    if reference is None:
        raise ValueError("no runs to compare")
    names = [s.name for s in _scores_of(reference[0], chosen)]
    if not names:
        raise ValueError(f"{chosen[reference[0].path].path} holds no accuracy metric (acc / acc_norm)")
    return names, reference[2]


def group_scores(group: RunGroup, tasks: list[str], chosen: Chosen) -> GroupScores:
    per_seed: list[dict[str, float]] = []
    stderrs: dict[str, float | None] = {}
    metrics: dict[str, str] = {}
    for run in group.runs:
        scores = {s.name: s for s in _scores_of(run, chosen)}
        row = {name: scores[name].value for name in tasks}
        row[AVERAGE] = statistics.fmean(row[name] for name in tasks)
        per_seed.append(row)
        for name in tasks:
            stderrs[name] = scores[name].stderr
            metrics[name] = scores[name].metric
    known = [stderrs[name] for name in tasks if stderrs[name] is not None]
    # Average of T tasks with independent errors: sqrt(sum se^2) / T.
    stderrs[AVERAGE] = math.sqrt(sum(se * se for se in known)) / len(tasks) if len(known) == len(tasks) else None
    per_task = {name: Stat.of([row[name] for row in per_seed], stderrs[name]) for name in [*tasks, AVERAGE]}
    return GroupScores(group.label, per_task, metrics, per_seed)


def accuracy_table(scores: list[GroupScores], tasks: list[str]) -> str:
    base = scores[0]
    header = ["Task", "Metric", *[s.label for s in scores], *[f"Δ {s.label} − {base.label}" for s in scores[1:]]]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for name in [*tasks, AVERAGE]:
        metric = base.metrics.get(name, "")
        cells = [stat_text(s.per_task[name]) for s in scores]
        deltas = [delta_text(base.per_task[name], s.per_task[name]) for s in scores[1:]]
        row = [name, metric, *cells, *deltas]
        if name == AVERAGE:
            row = [f"**{c}**" if c else c for c in row]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _summary_value(group: RunGroup, key: str) -> float | None:
    values = [run.summary.get(key) for run in group.runs]
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    return numbers[0] if numbers else None


def _model_name(run: Run) -> str:
    """Preset name plus any overrides (the ablations: moe_projections, num_experts, ...)."""
    name = str(run.summary.get("model") or run.config.get("model") or "n/a")
    overrides = run.summary.get("model_overrides") or run.config.get("model_overrides") or {}
    if isinstance(overrides, dict) and overrides:
        name += " (" + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(overrides.items())) + ")"
    return name


def model_rows(groups: list[RunGroup]) -> list[dict[str, Any]]:
    rows = []
    for group in groups:
        losses = [loss for loss in (run.final_val_loss for run in group.runs) if loss is not None]
        rows.append(
            {
                "label": group.label,
                "model": _model_name(group.runs[0]),
                "seeds": [run.seed for run in group.runs],
                "total_params": _summary_value(group, "total_params"),
                "active_params": _summary_value(group, "active_params"),
                "flops_per_token": _summary_value(group, "flops_per_token"),
                "tokens": _summary_value(group, "tokens"),
                "final_val_loss": asdict(Stat.of(losses)) if losses else None,
            }
        )
    return rows


def model_table(rows: list[dict[str, Any]]) -> str:
    def loss(row: dict[str, Any]) -> str:
        stat = row["final_val_loss"]
        if stat is None:
            return "n/a"
        return f"{stat['mean']:.4f}" + (f" ± {stat['std']:.4f}" if stat["std"] is not None else "")

    fields = [
        ("Model", lambda r: str(r["model"])),
        ("Seeds", lambda r: ", ".join("?" if s is None else str(s) for s in r["seeds"])),
        ("Total parameters", lambda r: human(r["total_params"])),
        ("Active parameters", lambda r: human(r["active_params"])),
        ("FLOPs per token (forward)", lambda r: human(r["flops_per_token"], "FLOP")),
        ("Training tokens", lambda r: human(r["tokens"])),
        ("Final validation loss", loss),
    ]
    lines = ["| | " + " | ".join(r["label"] for r in rows) + " |", "|---|" + "---:|" * len(rows)]
    for title, render in fields:
        lines.append(f"| {title} | " + " | ".join(render(r) for r in rows) + " |")
    return "\n".join(lines) + "\n"


def build_report(groups: list[RunGroup], out_dir: Path) -> tuple[str, str, dict[str, Any]]:
    """(full markdown report, accuracy table, results.json content); also draws the two PNGs into out_dir."""
    from evals.plots import plot_accuracy, plot_losses, plot_zero_shot

    chosen = choose_evaluations(groups)
    tasks, limit = check_comparable(groups, chosen)
    scores = [group_scores(group, tasks, chosen) for group in groups]
    rows = model_rows(groups)
    table = accuracy_table(scores, tasks)
    n_seeds = {len(g.runs) for g in groups}
    multi = max(n_seeds) > 1
    spread = (
        "cells are mean ± standard deviation over seeds; a delta's ± is the standard error of the difference of "
        "the means"
        if multi
        else "one seed per model; a delta's ± is the standard error from the finite number of test documents only "
        "(lm-eval's stderr, taken as independent: conservative, both models saw the same documents); use --seeds N "
        "to measure seed-to-seed noise"
    )
    plot_accuracy(scores, tasks, out_dir / "accuracy.png")
    plot_losses(groups, out_dir / "loss.png")
    during = plot_zero_shot(groups, out_dir / "zero_shot.png")
    report = "\n".join(
        [
            "# ParameterNet comparison",
            "",
            "Runs: "
            + "; ".join(
                f"**{g.label}** = `{g.path}` ({len(g.runs)} seed{'s' if len(g.runs) > 1 else ''})" for g in groups
            )
            + ".",
            "",
            "## Zero-shot accuracy (%)",
            "",
            f"lm-evaluation-harness, 0-shot, documents per task: {limit if limit is not None else 'all'}. "
            f"Metric: acc_norm where lm-eval defines it, else acc. Baseline: {groups[0].label}; {spread}; "
            "* marks |delta| > 2 standard errors.",
            "",
            table,
            "![accuracy](accuracy.png)",
            "",
            *(
                ["Zero-shot accuracy during training (--eval_tasks):", "", "![zero-shot](zero_shot.png)", ""]
                if during
                else []
            ),
            "## Models",
            "",
            model_table(rows),
            "![loss](loss.png)",
            "",
        ]
    )
    data = {
        "baseline": groups[0].label,
        "limit": limit,
        "tasks": tasks,
        "groups": [
            {
                "label": s.label,
                "path": str(g.path),
                "runs": [str(r.path) for r in g.runs],
                "evaluations": [str(chosen[r.path].path) for r in g.runs],
                "metrics": s.metrics,
                "accuracy": {name: asdict(stat) for name, stat in s.per_task.items()},
                "accuracy_per_seed": s.per_seed,
                "delta_vs_baseline": {
                    name: dict(zip(("delta", "stderr"), delta(scores[0].per_task[name], stat)))
                    for name, stat in s.per_task.items()
                },
                **{k: v for k, v in row.items() if k != "label"},
            }
            for s, g, row in zip(scores, groups, rows)
        ],
    }
    return report, table, data


def compare(
    runs: list[Path | str],
    out_dir: Path | str | None = None,
    labels: list[str] | None = None,
    evaluate: bool = False,
    eval_kwargs: dict[str, Any] | None = None,
) -> tuple[Path, str]:
    """Write the comparison of `runs` to out_dir; returns (out_dir, accuracy table)."""
    if len(runs) < 2:
        raise ValueError(f"give at least two runs to compare (got {len(runs)})")
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"--labels has {len(labels)} names for {len(runs)} runs; give one per run")
    groups = [load_group(Path(r), labels[i] if labels else None) for i, r in enumerate(runs)]
    seen: dict[str, int] = {}
    for group in groups:  # same directory names under different parents: qualify them
        seen[group.label] = seen.get(group.label, 0) + 1
    for group in groups:
        if seen[group.label] > 1 and labels is None:
            group.label = f"{group.path.parent.name}/{group.path.name}"
    task = check_one_task(groups)
    if task == VISION:
        check_vision_runs(groups)  # refuses unfinished or incomparable runs before anything is created
    unfinished = unfinished_runs(groups)
    if unfinished is not None:  # its last validation loss is not a final one, nor its evaluation of final weights
        raise ValueError(unfinished)
    if task == VISION and evaluate:
        raise ValueError(
            "--evaluate runs lm-eval on language models; vision runs were evaluated by vision.train "
            "itself (top-1 / top-5 in summary.json): drop --evaluate"
        )
    out = Path(out_dir) if out_dir is not None else groups[0].path.parent / "compare"
    # The report is a view of runs that stay on disk: an earlier report of ours is replaced, anything else refused.
    claim_output(out, overwrite=True, flag="--out", tool=TOOL, proof=REPORT_META)
    if task == VISION:
        return _publish(out, lambda tmp: build_vision_report(groups, tmp))
    for group in groups:
        for run in group.runs:
            if load_evaluations(run.eval_dir):
                continue
            if not evaluate:
                raise FileNotFoundError(
                    f"{run.path} has not been evaluated (no {run.results_path}); run "
                    f"`python -m evals.zero_shot --model {run.path}` first, or pass --evaluate"
                )
            from evals.zero_shot import run_zero_shot

            run_zero_shot(run.path, output_dir=run.eval_dir, **(eval_kwargs or {}))
    choose_evaluations(groups)  # refuses incomparable runs before anything is created
    return _publish(out, lambda tmp: build_report(groups, tmp))


def _publish(out: Path, build: Callable[[Path], tuple[str, str, dict[str, Any]]]) -> tuple[Path, str]:
    """Builds the report in a temporary directory beside `out`, then replaces `out` with it in one step."""
    tmp = temp_dir_for(out)
    try:
        report, table, data = build(tmp)
        write_text_atomic(tmp / "report.md", report)
        write_text_atomic(tmp / "results.json", json.dumps(data, indent=2) + "\n")
        write_owner(tmp, TOOL, REPORT_META)
        publish_dir(tmp, out)  # also gives the plots the umask's mode
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals.compare", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "runs",
        nargs="+",
        type=Path,
        help="run directories (or directories of per-seed run directories); the first is the baseline",
    )
    p.add_argument("--out", type=Path, default=None, help="output directory (default: FIRST_RUN/../compare)")
    p.add_argument("--labels", default=None, help="comma-separated column names (default: directory names)")
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="evaluate runs that have no eval/results.json yet (with the options below)",
    )
    p.add_argument("--tasks", default="llama", help="with --evaluate: tasks (default: the LLaMA zero-shot suite)")
    p.add_argument("--limit", type=float, default=None, help="with --evaluate: documents per task")
    p.add_argument(
        "--offline",
        dest="offline",
        action="store_const",
        const=True,
        default=None,
        help="with --evaluate: use the offline tasks",
    )
    p.add_argument("--batch_size", default="8", help="with --evaluate: batch size")
    p.add_argument("--device", default=None, help="with --evaluate: device")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    try:
        eval_kwargs = {
            "tasks": args.tasks,
            "limit": args.limit,
            "offline": args.offline,
            "batch_size": parse_batch_size(args.batch_size),
            "device": args.device,
        }
        out, table = compare(args.runs, args.out, labels, args.evaluate, eval_kwargs)
    except (ValueError, FileNotFoundError) as exc:
        print_error(str(exc))
        return 2
    print(table)
    plots = [out / name for name in ("accuracy.png", "loss.png", "zero_shot.png") if (out / name).is_file()]
    print(f"report: {out / 'report.md'} (plots: {', '.join(map(str, plots))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
