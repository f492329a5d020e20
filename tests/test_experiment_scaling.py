"""The token-scaling study (`launch/experiment.sh paper-llm-scaling`, issue 20): log-spaced validation iterations, the
report's paired differences and crossover on hand-written runs, and the command end to end, twice (the second call
trains nothing)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from evals.experiment import main
from evals.experiment.arms import BASELINE, CEILING, STANDARD_MOE, select_arms
from evals.experiment.scaling import crossover, non_embedding_params, write_scaling_report
from evals.experiment.stats import paired_difference
from evals.runs import load_run
from llm.train.config import TrainConfig, load_config
from runtime.dist import free_port
from tests.trainer_utils import tiny_args

REPO = Path(__file__).resolve().parents[1]


def test_validation_iterations_every_interval_or_log_spaced() -> None:
    assert sorted(TrainConfig(train_iters=60, eval_interval=20).validation_iterations()) == [20, 40, 60]
    assert sorted(TrainConfig(train_iters=50, eval_interval=20).validation_iterations()) == [20, 40, 50]
    # 10 points from 10 to 400: the ratio 40 ** (1/9) = 1.507 between neighbours, rounded to whole iterations
    log = sorted(TrainConfig(train_iters=400, eval_interval=10, eval_points=10).validation_iterations())
    assert log == [10, 15, 23, 34, 52, 78, 117, 176, 265, 400]
    ratios = [b / a for a, b in zip(log, log[1:])]
    assert all(abs(r - 40 ** (1 / 9)) < 0.06 for r in ratios)
    assert sorted(TrainConfig(train_iters=5, eval_interval=10, eval_points=4).validation_iterations()) == [5]
    assert sorted(TrainConfig(train_iters=8, eval_interval=1, eval_points=1).validation_iterations()) == [8]
    # the micro preset the study uses: 10 validations, the first at iteration 10
    micro = load_config("micro")
    assert len(micro.validation_iterations()) == 10 and min(micro.validation_iterations()) == 10


def test_eval_points_is_checked() -> None:
    with pytest.raises(ValueError, match="eval_points"):
        load_config("micro", cli_overrides=["--eval_points", "-1"])


def test_micro_preset_reads_two_tokens_per_non_embedding_parameter(tmp_path: Path) -> None:
    """The regime the issue asks for: >= 2 tokens per non-embedding dense parameter, at most one pass over the data."""
    cfg = load_config("micro")
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"task": "llm", "model": cfg.model, "model_overrides": {}}))
    dense = non_embedding_params(load_run(run))
    hidden, inter, layers = 128, 344, 4  # by hand: attention 4 h^2, SwiGLU 3 h i, two norms per layer, a final norm
    assert dense == layers * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) + hidden
    tokens = cfg.resolved_train_iters() * cfg.global_batch_size * cfg.seq_len
    assert tokens / dense >= 2.0 and tokens <= 5_000_000  # pd-english's training split: 5.02M tokens


def test_scaling_arms() -> None:
    arms = {arm.name: arm for arm in select_arms("paper-llm-scaling", "micro", None)}
    assert list(arms) == [BASELINE, "pn-down-e8", "pn-up-e8", STANDARD_MOE, CEILING]
    spec = f'{STANDARD_MOE} parameternet --model moe-mlp-llama-micro --model_overrides {{"routing_recipe":"centered"}}'
    assert arms[STANDARD_MOE].run_spec("micro") == spec  # the recipe it was trained with, named
    assert arms[CEILING].overrides["intermediate_size"] > 344


def test_canonical_moe_budget_has_room_and_reads_the_text_at_most_once() -> None:
    """issue 32: >= 6 tokens per non-embedding parameter of llama-micro, no repeated text (pd-english's 5.02M
    training tokens), the LR annealed by the last validation (the primary endpoint)."""
    from llm.train.config import load_config

    cfg = load_config("micro-room")
    tokens = cfg.resolved_train_iters() * cfg.global_batch_size * cfg.seq_len
    assert tokens / 791_680 >= 6.0 and tokens <= 5_020_000
    assert cfg.lr_decay_style == "linear" and max(cfg.validation_iterations()) == cfg.resolved_train_iters()


def test_canonical_moe_arms_and_their_seeds() -> None:
    """Every routed arm of the study uses the normalized gate; the diagnostics train with at most 2 seeds; the peer is
    transformers' Mixtral at the standard MoE's shapes."""
    arms = {arm.name: arm for arm in select_arms("canonical-moe", "micro", None)}
    assert list(arms) == [
        BASELINE, CEILING, STANDARD_MOE, "mixtral-e8", "pn-up-e8", "moe-mlp-e8-paper", "moe-mlp-e8-hash",
    ]  # fmt: skip
    for name in (STANDARD_MOE, "pn-up-e8", "moe-mlp-e8-paper", "moe-mlp-e8-hash"):
        assert arms[name].overrides["router_gate"] == "normalized"
    assert arms["mixtral-e8"].run_spec("micro") == "mixtral-e8 parameternet --model mixtral-micro"
    assert arms["moe-mlp-e8-hash"].overrides["router_type"] == "hash"
    assert [a.max_seeds for a in arms.values()] == [None, None, None, None, None, 2, 2]


def test_arms_lines_carry_each_arms_seed_count(capsys) -> None:
    from evals.experiment import main

    assert main(["arms", "canonical-moe", "--size", "micro", "--seeds", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["5", BASELINE], ["5", CEILING], ["5", STANDARD_MOE], ["5", "mixtral-e8"], ["5", "pn-up-e8"],
        ["2", "moe-mlp-e8-paper"], ["2", "moe-mlp-e8-hash"],
    ]  # fmt: skip
    assert main(["arms", "canonical-moe", "--size", "micro", "--seeds", "1"]) == 0
    assert all(line.startswith("1 ") for line in capsys.readouterr().out.splitlines())


# ------------------------------------------------------------------------------------------ the report
POINTS = [10, 20, 40, 80, 160]  # iterations; tokens = 1000 x iteration


def fake_scaling_run(
    run: Path, model: str, seed: int, curve: list[float], cv: float | None = None, zero_shot: bool = False
) -> None:
    """A finished run directory as llm.train writes it, with validations at POINTS, router diagnostics and (with
    `zero_shot`) the accuracies of --eval_tasks at each validation."""
    run.mkdir(parents=True)
    config = {"seed": seed, "global_batch_size": 4, "corpus": "pd-english", "eval_iters": 2, "lr_decay_style": "wsd"}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {
        "task": "llm",
        "model": model,
        "model_overrides": {},
        "total_params": 1000,
        "active_params": 900,
        "seq_len": 250,
        "final_val_loss": curve[-1],
        "tokens": 1000 * POINTS[-1],
        "iterations": POINTS[-1],
        "seed": seed,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    records = []
    for it, loss in zip(POINTS, curve):
        train = {"kind": "train", "iteration": it, "tokens": 1000 * it, "lm_loss": loss, "tokens_per_s": 100.0}
        if cv is not None:  # two MoE layers; the report averages them
            for layer, scale in (("layers.0.mlp", 0.5), ("layers.1.mlp", 1.5)):
                train |= {f"moe/{layer}/cv": cv * scale, f"moe/{layer}/top1_prob": 0.3, f"moe/{layer}/entropy": 1.9}
        records += [train, {"kind": "valid", "iteration": it, "tokens": 1000 * it, "val_loss": loss}]
        if zero_shot:
            records.append({"kind": "zero_shot", "iteration": it, "tokens": 1000 * it, "arc_easy": 0.3, "piqa": 0.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_crossover_is_the_first_point_below_zero_for_good() -> None:
    def diff(values: list[float]):
        return paired_difference({s: 0.0 for s in range(len(values))}, dict(enumerate(values)))

    below, above, holds_zero = diff([-0.2, -0.21, -0.19]), diff([0.2, 0.21, 0.19]), diff([-0.3, 0.1, 0.2])
    assert crossover({1: below, 2: above, 3: below, 4: below}) == 3
    assert crossover({1: below, 2: holds_zero}) is None and crossover({1: above}) is None
    assert crossover({1: below, 2: below}) == 1 and crossover({}) is None


def test_scaling_report_on_hand_written_runs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "scaling"
    seeds = (1234, 1235, 1236)
    base = {s: [6.0, 5.5, 5.0, 4.6, 4.3] for s in seeds}
    # the standard MoE: worse early, below vanilla for good from the third validation on (tokens 40 k)
    moe = {s: [6.1 + 0.01 * i, 5.45 + 0.1 * i, 4.95 - 0.01 * i, 4.5, 4.1 + 0.01 * i] for i, s in enumerate(seeds)}
    headline = {s: [6.05, 5.6, 5.05 + 0.01 * i, 4.62 + 0.01 * i, 4.32 + 0.005 * i] for i, s in enumerate(seeds)}
    for s in seeds:
        fake_scaling_run(out / BASELINE / f"seed{s}", "llama-micro", s, base[s], zero_shot=True)
        fake_scaling_run(out / STANDARD_MOE / f"seed{s}", "moe-mlp-llama-micro", s, moe[s], cv=0.2)
        fake_scaling_run(
            out / "pn-down-e8" / f"seed{s}", "parameternet-llama-micro", s, headline[s], cv=0.4, zero_shot=True
        )
    unfinished = out / "pn-up-e8" / "seed1234"
    unfinished.mkdir(parents=True)
    (unfinished / "config.yaml").write_text(yaml.safe_dump({"seed": 1234, "train_iters": 160}))
    (unfinished / "metrics.jsonl").write_text(json.dumps({"kind": "train", "iteration": 10, "tokens": 10_000}) + "\n")

    assert main(["report", str(out), "--experiment", "paper-llm-scaling"]) == 0
    assert "routing.png" in capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    arms = {arm["name"]: arm for arm in data["arms"]}
    assert list(arms) == [BASELINE, "pn-down-e8", STANDARD_MOE]  # the experiment's order; pn-up-e8 left out
    assert any("pn-up-e8/seed1234" in why for why in data["left_out"])
    assert arms[STANDARD_MOE]["crossover_tokens"] == 40_000 and arms["pn-down-e8"]["crossover_tokens"] is None
    final = arms[STANDARD_MOE]["diffs"]["160000"]  # against a hand computation
    diffs = [moe[s][-1] - base[s][-1] for s in seeds]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert final["mean"] == pytest.approx(mean) and final["high"] == pytest.approx(mean + 4.302653 * sd / math.sqrt(3))
    assert arms[STANDARD_MOE]["router"]["cv"]["10000"] == pytest.approx(0.2)  # the mean of 0.1 and 0.3 over layers
    assert arms[BASELINE]["router"] == {} and data["non_embedding_params"] == 791_680
    assert arms[STANDARD_MOE]["routing"].startswith("centered") and arms[BASELINE]["routing"].startswith("dense")
    report = (out / "report.md").read_text()
    assert "crossover at 40.00 k tokens (0.05 tokens per parameter)" in report
    assert "no crossover up to 160.00 k tokens (0.20 tokens per parameter)" in report
    assert (out / "loss.png").stat().st_size > 0 and (out / "routing.png").stat().st_size > 0
    assert (out / "zero_shot.png").stat().st_size > 0 and "![zero-shot](zero_shot.png)" in report  # --eval_tasks
    assert write_scaling_report(out) == out / "report.md"  # rewrites its own report

    (out / "report.md").write_text("# my notes\n")
    assert main(["report", str(out), "--experiment", "paper-llm-scaling"]) == 2
    assert "not written by evals.experiment" in capsys.readouterr().err
    assert (out / "report.md").read_text() == "# my notes\n"


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_scaling_experiment_sh_end_to_end_twice(tmp_path: Path) -> None:
    out = tmp_path / "scaling"
    env = {
        **os.environ,
        "MASTER_PORT": str(free_port()),
        "NPROC": "1",
        "ARMS": f"{BASELINE},{STANDARD_MOE}",
        "SEEDS": "2",
        "OUT": str(out),
    }
    changes = dict(global_batch_size=2, eval_interval=1, warmup_iters=1, progress_bar=None, model_overrides=None)
    tiny = tiny_args(train_iters=4, eval_points=3, save_interval=100, **changes)
    command = ["bash", "launch/experiment.sh", "paper-llm-scaling", "--", *tiny]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    first = run()
    assert first.returncode == 0, first.stderr[-4000:]
    assert first.stderr.count("=== train ") == 4
    runs = [out / arm / f"seed{s}" for arm in (BASELINE, STANDARD_MOE) for s in (1234, 1235)]
    for run_dir in runs:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        # eval_points 3 from iteration 1 to 4: 1, 2 (round(1 x 2)) and 4, on the same validation tokens in every run
        assert [r["iteration"] for r in records if r["kind"] == "valid"] == [1, 2, 4]
        assert not (run_dir / "hf").exists()  # no export: the study reads validation loss only
    moe_train = [json.loads(line) for line in (runs[2] / "metrics.jsonl").read_text().splitlines()]
    assert any(key.endswith("/top1_prob") for key in moe_train[0])
    data = json.loads((out / "report.json").read_text())
    assert [a["name"] for a in data["arms"]] == [BASELINE, STANDARD_MOE]
    assert sorted(data["arms"][1]["diffs"]) == ["128", "256", "64"]  # 2 x 32 tokens per iteration at 1, 2, 4

    stamps = {p: p.stat().st_mtime_ns for p in (r / "summary.json" for r in runs)}
    second = run()
    assert second.returncode == 0, second.stderr[-4000:]
    assert "=== train " not in second.stderr and second.stderr.count("skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "report.json").read_text()) == data


def test_no_zero_shot_plot_without_eval_tasks_records(tmp_path: Path) -> None:
    from evals.plots import plot_zero_shot
    from evals.runs import load_group

    fake_scaling_run(tmp_path / "arm" / "seed1", "llama-micro", 1, [6.0, 5.5, 5.0, 4.6, 4.3])
    assert plot_zero_shot([load_group(tmp_path / "arm", label="arm")], tmp_path / "zero_shot.png") is False
    assert not (tmp_path / "zero_shot.png").exists()
