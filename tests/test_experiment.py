"""launch/experiment.sh and its report (evals.experiment): the paired statistics against hand computations and scipy,
the arms (the ceiling's width against a hand count), the report on hand-written run directories, and the whole
command end to end with 2 arms x 2 seeds x 2 iterations, run twice: the second call trains nothing (paper-llm and
paper-vision)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from scipy import stats as scipy_stats

from evals.experiment import main
from evals.experiment.arms import BASELINE, EXPERIMENTS, HEADLINE, PAPER_LLM, matched_intermediate_size, select_arms
from evals.experiment.report import write_report
from evals.experiment.stats import difference_curve, paired_difference
from evals.results import store_evaluation
from evals.scores import band
from llm.model.presets import load_model_config
from runtime.dist import free_port
from tests.trainer_utils import metric_records, tiny_args

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------- statistics
def test_paired_difference_by_hand_and_against_scipy() -> None:
    base = {1: 3.00, 2: 3.10, 3: 2.90}
    other = {1: 2.90, 2: 3.05, 3: 2.78, 4: 1.0}  # seed 4 has no partner: left out
    diff = paired_difference(base, other)
    assert diff is not None and diff.seeds == (1, 2, 3)
    d = [-0.10, -0.05, -0.12]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2)
    assert diff.per_seed == pytest.approx(d)
    assert (diff.mean, diff.std) == pytest.approx((mean, sd))
    assert (diff.low, diff.high) == pytest.approx((mean - half, mean + half))
    assert diff.excludes_zero is True
    ref = scipy_stats.ttest_rel([other[s] for s in (1, 2, 3)], [base[s] for s in (1, 2, 3)])
    assert diff.p_value == pytest.approx(ref.pvalue)
    assert (diff.low, diff.high) == pytest.approx(tuple(ref.confidence_interval(0.95)))

    straddles = paired_difference({1: 3.0, 2: 3.0, 3: 3.0}, {1: 2.9, 2: 3.1, 3: 2.95})
    assert straddles is not None and straddles.excludes_zero is False and straddles.p_value > 0.05
    one = paired_difference({7: 3.0}, {7: 2.5})
    assert one is not None and (one.mean, one.low, one.p_value, one.excludes_zero) == (-0.5, None, None, None)
    equal = paired_difference({1: 0.0, 2: 1.0}, {1: 1.0, 2: 2.0})  # scipy: t = inf, p = 0 (precision loss)
    assert equal is not None and (equal.std, equal.low, equal.high, equal.p_value) == (0.0, 1.0, 1.0, None)
    assert paired_difference({1: 3.0}, {2: 3.0}) is None


def test_curves_mean_std_and_paired_band() -> None:
    base = {1: {10.0: 5.0, 20.0: 4.0}, 2: {10.0: 5.2, 20.0: 4.2, 30.0: 3.0}}  # x=30 only in one seed: dropped
    other = {1: {10.0: 4.9, 20.0: 3.8}, 2: {10.0: 5.0, 20.0: 4.1}}
    xs, means, stds = band(list(base.values()))
    assert xs == [10.0, 20.0] and means == pytest.approx([5.1, 4.1]) and stds == pytest.approx([0.1414214, 0.1414214])
    xs, means, lows, highs = difference_curve(base, other)
    assert xs == [10.0, 20.0] and means == pytest.approx([-0.15, -0.15])
    half = 12.706204736174698 * 0.05 * math.sqrt(2) / math.sqrt(2)  # d = (-0.1, -0.2) then (-0.2, -0.1): sd 0.0707
    assert lows[0] == pytest.approx(-0.15 - half) and highs[1] == pytest.approx(-0.15 + half)


# ------------------------------------------------------------------------------------------------------ arms
def hand_count(h: int, layers: int, inter: int, vocab: int, experts: int = 1) -> int:
    """LLaMA (untied embeddings), with `experts` copies of down_proj and a router (inter -> experts, with a bias: the
    presets' centred routing) when > 1."""
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    moe = (experts - 1) * inter * h + inter * experts + experts if experts > 1 else 0
    return 2 * vocab * h + layers * (per_layer + moe) + h


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_ceiling_matches_parameternet_total_by_hand_count(size: str) -> None:
    dims = load_model_config(f"llama-{size}")  # resolved: llama-small is llama-tiny under another name
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    h, layers, inter, vocab = (getattr(dims, k) for k in keys)
    target = hand_count(h, layers, inter, vocab, experts=8)
    nearest = min(range(inter, 5 * inter), key=lambda n: abs(hand_count(h, layers, n, vocab) - target))
    assert matched_intermediate_size(size) == (nearest, hand_count(h, layers, nearest, vocab), target)
    assert abs(hand_count(h, layers, nearest, vocab) - target) <= 1.5 * h * layers


def test_arms_and_their_selection(capsys) -> None:
    names = [arm.name for arm in select_arms("paper-llm", "tiny", None)]
    assert names == [BASELINE, HEADLINE, "pn-gate-e8", "pn-up-e8", "pn-down-e2", "pn-down-e4", "vanilla-wide"]
    wide, _, _ = matched_intermediate_size("tiny")
    assert main(["arms", "paper-llm", "--size", "tiny", "--arms", "vanilla-wide,vanilla"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "vanilla llama",
        f'vanilla-wide llama --model_overrides {{"intermediate_size":{wide}}}',
    ]
    assert main(["arms", "paper-llm", "--size", "tiny", "--arms", "pn-up-e8,vanilla"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "vanilla llama",
        'pn-up-e8 parameternet --model_overrides {"moe_projections":["up_proj"],"num_experts":8,"top_k":1,'
        '"routing_recipe":"paper"}',
    ]
    for arms, message in (
        ("vanilla,pn-dwn-e8", "ARMS: pn-dwn-e8 not in paper-llm"),
        ("pn-down-e8,pn-up-e8", "include 'vanilla'"),
        ("vanilla", "at least two arms"),
    ):
        assert main(["arms", "paper-llm", "--size", "tiny", "--arms", arms]) == 2
        assert message in capsys.readouterr().err
    assert main(["arms", "paper-llm", "--size", "huge", "--arms", "vanilla,vanilla-wide"]) == 2
    assert "llama-huge" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- the report, by hand
TASKS = ("arc_easy", "piqa")


def fake_run(
    run: Path, arm: str, seed: int, val_loss: float, acc: float, params: int, curve: list[float], speed: float
) -> None:
    """A finished, evaluated run directory as llm.train and evals.zero_shot write it."""
    run.mkdir(parents=True)
    tokens = 1000 * len(curve)
    model = "llama-tiny" if arm.startswith("vanilla") else "parameternet-llama-tiny"
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "global_batch_size": 2, "data_path": []}))
    summary = {
        "task": "llm",
        "model": model,
        "model_overrides": {},
        "total_params": params,
        "active_params": 7_000_000,
        "flops_per_token": 14_000_000,
        "seq_len": 500,
        "final_val_loss": val_loss,
        "tokens": tokens,
        "iterations": len(curve),
        "seed": seed,
        "world_size": 1,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    records = [{"kind": "train", "iteration": 1, "tokens": 1000, "lm_loss": 9.0, "tokens_per_s": 1.0}]  # start-up
    records += [
        {"kind": "train", "iteration": i, "tokens": 1000 * i, "lm_loss": 5.0, "tokens_per_s": speed}
        for i in range(2, len(curve) + 1)
    ]
    records += [
        {"kind": "valid", "iteration": i + 1, "tokens": 1000 * (i + 1), "val_loss": v} for i, v in enumerate(curve)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    results = {
        "results": {f"{t}_offline": {"acc,none": acc, "acc_stderr,none": 0.1, "acc_norm,none": acc} for t in TASKS},
        "n-samples": {f"{t}_offline": {"effective": 20, "original": 100} for t in TASKS},
        "config": {"limit": 20},
        "evals": {"step": len(curve), "evaluated_at": time.time()},
    }
    store_evaluation(run / "eval", results, "table\n")


def fake_experiment(out: Path, headline_losses: list[float]) -> None:
    vanilla = [3.00, 3.10, 2.90]
    for i, seed in enumerate((1234, 1235, 1236)):
        fake_run(
            out / BASELINE / f"seed{seed}",
            BASELINE,
            seed,
            vanilla[i],
            0.50 + 0.01 * i,
            7_300_000,
            [5.0, 4.0, vanilla[i]],
            3000.0 + i,
        )
        fake_run(
            out / HEADLINE / f"seed{seed}",
            HEADLINE,
            seed,
            headline_losses[i],
            0.52,
            12_200_000,
            [4.9, 3.8, headline_losses[i]],
            2500.0,
        )


def test_report_on_hand_written_runs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "exp"
    fake_experiment(out, [2.90, 3.05, 2.78])  # differences -0.10, -0.05, -0.12
    (out / HEADLINE / "seed1237").mkdir()  # interrupted: metrics only, no summary
    (out / HEADLINE / "seed1237" / "metrics.jsonl").write_text("")
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    d = [-0.10, -0.05, -0.12]
    mean = sum(d) / 3
    half = 4.302652729911275 * math.sqrt(sum((x - mean) ** 2 for x in d) / 2) / math.sqrt(3)
    interval = f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"
    assert f"| {HEADLINE} |" in report and interval in report
    assert "the 95% interval excludes 0: significant at the 5% level" in report
    assert "3.0000 ± 0.1000" in report  # vanilla's mean ± sample std over its three seeds
    assert "| 12,200,000 | 7,000,000 | 14.00 MFLOP | 1.6712x |" in report
    assert "| 3,001 ± 1 |" in report  # tokens/s: median of each run's records (the start-up one is not it), over seeds
    assert f"`{HEADLINE}/seed1237`: not finished" in report
    assert (
        f"`{BASELINE}/seed1234` | `{BASELINE}/seed1234/eval/results/step00000003_arc_easy+piqa_limit20.json` |"
        in report
    )
    # accuracy: vanilla 50, 51, 52 % vs 52 %: paired differences +2, +1, 0 points
    acc = paired_difference({1: 0.50, 2: 0.51, 3: 0.52}, {1: 0.52, 2: 0.52, 3: 0.52})
    assert acc is not None and f"{100 * acc.mean:+.2f} [{100 * acc.low:+.2f}, {100 * acc.high:+.2f}]" in report
    data = json.loads((out / "report.json").read_text())
    head = data["arms"][1]
    assert head["name"] == HEADLINE and head["final_val_loss"] == {"1234": 2.90, "1235": 3.05, "1236": 2.78}
    assert head["loss_diff"]["per_seed"] == pytest.approx(d) and head["total_params"] == 12_200_000
    for png in ("loss.png", "accuracy.png"):
        assert (out / png).stat().st_size > 10_000
    assert "significant" in capsys.readouterr().out


def test_report_says_not_significant_when_the_interval_holds_zero(tmp_path: Path) -> None:
    out = tmp_path / "exp"
    fake_experiment(out, [2.95, 3.12, 2.93])  # differences -0.05, +0.02, +0.03
    write_report(out)
    report = (out / "report.md").read_text()
    assert "the 95% interval includes 0: not significant at the 5% level" in report
    assert "excludes 0" not in report.split("## Final validation loss")[0]


def test_reading_takes_the_roles_from_the_arm_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reading names no arm itself: rename every arm but the baseline and it follows the table's roles."""
    renamed = tuple(arm if arm.role == "baseline" else replace(arm, name=arm.name.upper()) for arm in PAPER_LLM)
    monkeypatch.setitem(EXPERIMENTS, "paper-llm", renamed)
    out = tmp_path / "exp"
    losses = {BASELINE: 3.0, "PN-DOWN-E8": 2.95, "PN-GATE-E8": 2.90, "PN-DOWN-E2": 2.99, "PN-DOWN-E4": 2.97}
    for arm, loss in losses.items():
        for i, seed in enumerate((1, 2, 3)):
            value = loss + 0.01 * i * (arm != BASELINE)
            fake_run(out / arm / f"seed{seed}", arm, seed, value, 0.5, 10, [4.0, value], 1.0)
    write_report(out)
    reading = (out / "report.md").read_text().split("## Reading")[1].split("##")[0]
    assert "ParameterNet (PN-DOWN-E8) ended with a lower final validation loss than vanilla" in reading
    assert "95% intervals): PN-GATE-E8 " in reading and "; PN-DOWN-E8 " in reading
    assert (
        "the lowest mean loss is PN-GATE-E8's. The 2- and 4-expert arms ran on down_proj, not on PN-GATE-E8" in reading
    )
    assert "Experts on down_proj: 2 experts " in reading and "the mean loss falls steadily" in reading
    assert "These 3 ablation intervals" in reading and "pn-" not in reading


def test_report_refusals(tmp_path: Path, capsys) -> None:
    out = tmp_path / "exp"
    fake_run(out / HEADLINE / "seed1", HEADLINE, 1, 3.0, 0.5, 10, [3.0], 1.0)
    assert main(["report", str(out)]) == 2
    assert "no 'vanilla' arm" in capsys.readouterr().err
    fake_run(out / BASELINE / "seed1", BASELINE, 1, 3.0, 0.5, 10, [3.0, 3.0], 1.0)  # twice the tokens
    assert main(["report", str(out)]) == 2
    assert "different token budgets" in capsys.readouterr().err
    (out / "report.md").write_text("my notes\n")
    assert main(["report", str(out)]) == 2
    assert "was not written by evals.experiment" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2


def stop_at(run: Path, iteration: int, of: int) -> None:
    """Make a hand-written run one that a signal stopped at `iteration` of `of`: a complete checkpoint there, no
    summary.json (the trainer writes it only when the run finishes)."""
    (run / "summary.json").unlink()
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "train_iters": of}))
    checkpoint = run / "checkpoints" / f"iter_{iteration:07d}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "complete.json").write_text(json.dumps({"iteration": iteration, "files": {}}))


def test_unfinished_runs_and_evaluations_of_earlier_steps_are_never_reported(tmp_path: Path, capsys) -> None:
    """Issue 25: evals.compare printed a stopped run's last validation loss as "Final validation loss" (exit 0), and
    the experiment report paired a run's final loss with an evaluation of an earlier checkpoint."""
    from evals.compare import main as compare_main
    from evals.runs import main as runs_main

    out = tmp_path / "exp"
    fake_experiment(out, [2.90, 3.05, 2.78])
    stopped = out / HEADLINE / "seed1236"
    stop_at(stopped, 6, 12)
    assert compare_main([str(out / BASELINE), str(out / HEADLINE), "--out", str(tmp_path / "cmp")]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"{stopped} is not finished (stopped at iteration 6 of 12, no final summary.json)" in line
    assert "--resume auto" in line and not (tmp_path / "cmp").exists()
    assert runs_main(["evaluated", str(stopped)]) == 1

    # A finished run whose only evaluation is of an earlier step (3) than its final iteration (4).
    stale = out / HEADLINE / "seed1235"
    summary = json.loads((stale / "summary.json").read_text())
    (stale / "summary.json").write_text(json.dumps({**summary, "iterations": 4}))
    capsys.readouterr()
    assert runs_main(["evaluated", str(stale)]) == 1
    assert "was evaluated at step 3 but finished at iteration 4" in capsys.readouterr().err
    assert runs_main(["evaluated", str(out / BASELINE / "seed1234")]) == 0
    assert compare_main([str(out / BASELINE / "seed1234"), str(stale), "--out", str(tmp_path / "cmp")]) == 2
    assert f"{stale} was evaluated at step 3 but finished at iteration 4" in capsys.readouterr().err

    assert main(["report", str(out)]) == 0  # both left out, named, in the list and in the reading
    report = (out / "report.md").read_text()
    reading = report.split("## Reading")[1].split("##")[0]
    for text in (reading, report.split("Left out")[1]):
        assert f"`{HEADLINE}/seed1236`: not finished (stopped at iteration 6 of 12" in text
        assert f"`{HEADLINE}/seed1235`: not evaluated at its final iteration 4" in text
    assert json.loads((out / "report.json").read_text())["arms"][1]["final_val_loss"] == {"1234": 2.90}


# ------------------------------------------------------------------------------------------- end to end
FAST_TRAINER = tiny_args(
    seq_len=64, global_batch_size=2, eval_interval=1, warmup_iters=None, model_overrides=None, save_interval=100
)


def paper_llm_env(out: Path, seeds: int, train_iters: int) -> dict[str, str]:
    """`launch/experiment.sh paper-llm`'s environment for the tiny pair: vanilla and the headline, one rank, piqa."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MASTER_PORT": str(free_port()),
        "NPROC": "1",
        "SIZE": "tiny",
        "ARMS": f"{BASELINE},{HEADLINE}",
        "SEEDS": str(seeds),
        "TRAIN_ITERS": str(train_iters),
        "TASKS": "piqa",
        "LIMIT": "2",
        "OUT": str(out),
    }


def test_experiment_sh_end_to_end_twice(tmp_path: Path) -> None:
    out = tmp_path / "paper-llm"
    env = paper_llm_env(out, seeds=2, train_iters=2)
    command = ["bash", "launch/experiment.sh", "paper-llm", "--", *FAST_TRAINER]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    first = run()
    assert first.returncode == 0, first.stderr[-4000:]
    assert first.stderr.count("=== train ") == 4 and first.stderr.count("=== evaluate ") == 4
    runs = [out / arm / f"seed{s}" for arm in (BASELINE, HEADLINE) for s in (1234, 1235)]
    for run_dir in runs:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["iterations"] == 2 and summary["tokens"] == 2 * 2 * 64
        assert (run_dir / "eval" / "results.json").is_file()
    data = json.loads((out / "report.json").read_text())
    assert [a["name"] for a in data["arms"]] == [BASELINE, HEADLINE] and data["tasks"] == ["piqa"]
    assert data["limit"] == 2
    for arm in data["arms"]:  # every number from the runs' own summary.json
        for seed, loss in arm["final_val_loss"].items():
            summary = json.loads((out / arm["name"] / f"seed{seed}" / "summary.json").read_text())
            assert loss == summary["final_val_loss"] and arm["total_params"] == summary["total_params"]
    assert data["arms"][1]["loss_diff"]["seeds"] == [1234, 1235]
    assert "## Reading" in first.stdout and (out / "loss.png").is_file() and (out / "compare" / "report.md").is_file()

    stamps = {p: p.stat().st_mtime_ns for r in runs for p in (r / "summary.json", r / "eval" / "results.json")}
    second = run()  # resumable: every run is finished and evaluated, so nothing trains or evaluates again
    assert second.returncode == 0, second.stderr[-4000:]
    assert "=== train " not in second.stderr and "=== evaluate " not in second.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "report.json").read_text()) == data


def ctrl_c_at_iteration_2(command: list[str], env: dict[str, str], run_dir: Path, log: Path) -> tuple[int, str]:
    """Start `command` in a process group of its own, press Ctrl-C (SIGINT to the whole foreground group, as a
    terminal does) once `run_dir` logged iteration 2, and return its exit code and output."""
    with open(log, "w") as sink:
        first = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=sink,
            start_new_session=True,
            # A terminal's foreground job takes Ctrl-C; a test suite started in the background by a non-interactive
            # shell (nohup ... &) inherits SIGINT ignored, and every child would ignore the press.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 600
            while not any(r.get("iteration", 0) >= 2 for r in metric_records(run_dir)):
                assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.1)
            os.killpg(first.pid, signal.SIGINT)
            rc = first.wait(timeout=600)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
    return rc, log.read_text()


INTERRUPTED_ITERS = 60  # long enough that Ctrl-C lands mid-run (the stop is seen within a second or two)


def test_experiment_sh_stops_on_ctrl_c_and_the_next_call_resumes(tmp_path: Path) -> None:
    """Issue 25: Ctrl-C (SIGINT to the process group) during a training made the trainer checkpoint and exit 0, and
    the experiment carried on - it evaluated the partial checkpoint, trained the next arm, wrote a report. Now it
    stops with exit 3 and one line saying where the training stopped; the same command resumes the run to its end,
    evaluates the final weights and writes the report."""
    out = tmp_path / "paper-llm"
    env = paper_llm_env(out, seeds=1, train_iters=INTERRUPTED_ITERS)
    command = ["bash", "launch/experiment.sh", "paper-llm", "--", *FAST_TRAINER]
    run_dir = out / BASELINE / "seed1234"
    rc, text = ctrl_c_at_iteration_2(command, env, run_dir, tmp_path / "first.log")
    assert rc == 3, text[-4000:]
    stopped = [r["iteration"] for r in metric_records(run_dir) if r["kind"] == "train"][-1]
    assert 2 <= stopped < INTERRUPTED_ITERS
    [line] = [line for line in text.splitlines() if "error:" in line]
    assert line.startswith(f"compare.sh: error: training of {BASELINE} (seed 1234) was stopped: {run_dir}: the ")
    assert f"is not finished (stopped at iteration {stopped} of {INTERRUPTED_ITERS}" in line
    assert "run the same command again to resume it" in line
    # nothing went on after the stop: no evaluation of the partial weights, no other arm, no report
    assert not (run_dir / "eval").exists() and not (out / HEADLINE).exists() and not (out / "report.md").exists()
    # What the old experiment.sh did next: an evaluation of the stopped run's checkpoint. It must not be reused.
    early = subprocess.run(
        ["bash", "launch/eval_zero_shot.sh", str(run_dir), "--tasks", "piqa", "--offline", "--limit", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert early.returncode == 0, early.stderr[-3000:]

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"resumed from iteration {stopped}" in second.stdout + second.stderr
    assert f"=== evaluate {BASELINE} (seed 1234)" in second.stderr  # its step-{stopped} evaluation is redone
    for arm in (BASELINE, HEADLINE):
        run = out / arm / "seed1234"
        assert json.loads((run / "summary.json").read_text())["iterations"] == INTERRUPTED_ITERS
        steps = sorted(json.loads(p.read_text())["evals"]["step"] for p in (run / "eval" / "results").glob("*.json"))
        assert steps == ([stopped] if arm == BASELINE else []) + [INTERRUPTED_ITERS]
    reported = json.loads((out / "report.json").read_text())["arms"][0]["evaluations"]
    assert [Path(p).name.split("_")[0] for p in reported.values()] == [f"step{INTERRUPTED_ITERS:08d}"]
    for arm in (BASELINE, HEADLINE):
        run = out / arm / "seed1234"
        keys = [(r["kind"], r["iteration"]) for r in metric_records(run)]
        assert len(keys) == len(set(keys))  # the replayed steps once each
    assert [a["name"] for a in json.loads((out / "report.json").read_text())["arms"]] == [BASELINE, HEADLINE]


def test_experiment_sh_refuses_bad_settings(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "SIZE": "tiny"}
    for extra, args, message in (
        ({}, [], "name the experiment"),
        ({}, ["paper-gpt"], "unknown experiment 'paper-gpt'"),
        ({"SEEDS": "0"}, ["paper-llm"], "SEEDS='0'"),
        ({"LIMIT": "x"}, ["paper-llm"], "LIMIT='x'"),
        ({"ARMS": "vanilla,pn-dwn-e8"}, ["paper-llm"], "pn-dwn-e8 not in paper-llm"),
        ({}, ["paper-llm", "--train_iters", "5"], "unknown option '--train_iters'"),
        ({"JOBS": "0"}, ["paper-vision"], "JOBS='0'"),
        ({"ARMS": "pn-e4"}, ["paper-vision"], "include 'static'"),
        ({"SEEDS": "x"}, ["paper-vision"], "SEEDS='x'"),
    ):
        proc = subprocess.run(
            ["bash", "launch/experiment.sh", *args],
            cwd=REPO,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,  # the ARMS case starts Python (transformers' import): seconds, minutes on a loaded machine
        )
        assert proc.returncode == 2 and message in proc.stderr, (args, extra, proc.stderr)
    assert not (tmp_path / "out").exists()


def test_vision_experiment_end_to_end_twice(tmp_path: Path) -> None:
    """paper-vision through launch/experiment.sh: vision.train runs per arm and seed, then the paired report, whose
    every top-1 is the run's own summary.json; a second call trains nothing."""
    out = tmp_path / "paper-vision"
    env = {**os.environ, "OUT": str(out), "SEEDS": "2", "ARMS": "static,pn-e2", "OMP_NUM_THREADS": "1"}
    command = ["bash", "launch/experiment.sh", "paper-vision", "--"]
    command += ["--train_subset", "128", "--val_subset", "64", "--epochs", "1", "--log_interval", "1"]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)

    first = run()
    assert first.returncode == 0, first.stderr[-4000:]
    assert first.stderr.count("=== train ") == 4
    top1 = {}
    for arm in ("static", "pn-e2"):
        for seed in (42, 43):
            summary = json.loads((out / arm / f"seed{seed}" / "summary.json").read_text())
            assert summary["seed"] == seed and summary["num_experts"] == (2 if arm == "pn-e2" else 0)
            top1[arm, seed] = summary["top1"]
    diff = paired_difference({s: top1["static", s] for s in (42, 43)}, {s: top1["pn-e2", s] for s in (42, 43)})
    assert diff is not None
    report = (out / "report.md").read_text()
    assert report.startswith("# ParameterNet vision experiment")
    assert "| pn-e2 | ParameterNet: dynamic convolutions with 2 experts | 42, 43 |" in report
    assert f"{diff.mean:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}]" in report
    data = json.loads((out / "report.json").read_text())
    assert data["paired_top1"]["pn-e2"]["per_seed"] == pytest.approx(list(diff.per_seed))
    assert data["groups"][1]["macs_vs_baseline"] < 1.10  # the premise: the free parameters cost <= ~10% MACs
    assert (out / "accuracy.png").is_file() and (out / "loss.png").is_file()

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/summary.json")}
    second = run()
    assert second.returncode == 0, second.stderr[-4000:]
    assert "=== train " not in second.stderr and second.stderr.count("skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_vision_experiment_stops_on_ctrl_c_and_the_next_call_resumes(tmp_path: Path) -> None:
    """paper-vision trains in background jobs, which a script's Ctrl-C does not reach: experiment.sh asks each to
    checkpoint and stop, exits 130 without a report, and the next call resumes the stopped run."""
    out = tmp_path / "paper-vision"
    env = {**os.environ, "OUT": str(out), "SEEDS": "1", "ARMS": "static,pn-e2", "OMP_NUM_THREADS": "1"}
    command = ["bash", "launch/experiment.sh", "paper-vision", "--"]
    command += ["--train_subset", "1280", "--val_subset", "64", "--epochs", "1", "--log_interval", "1"]
    command += ["--micro_batch_size", "16", "--global_batch_size", "16"]  # 80 steps: Ctrl-C lands mid-run
    run_dir = out / "static" / "seed42"
    rc, text = ctrl_c_at_iteration_2(command, env, run_dir, tmp_path / "first.log")
    assert rc == 130, text[-4000:]
    assert "experiment.sh: interrupted: every training running checkpoints and stops" in text
    stopped = [r["iteration"] for r in metric_records(run_dir) if r["kind"] == "train"][-1]
    assert 2 <= stopped < 80 and not (run_dir / "summary.json").exists()
    assert not (out / "pn-e2").exists() and not (out / "report.md").exists()

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    for arm in ("static", "pn-e2"):
        assert json.loads((out / arm / "seed42" / "summary.json").read_text())["iterations"] == 80
    keys = [(r["kind"], r["iteration"]) for r in metric_records(run_dir)]
    assert len(keys) == len(set(keys))
    assert (out / "report.md").read_text().startswith("# ParameterNet vision experiment")


def fake_vision_run(run: Path, model: str, experts: int, seed: int, top1: float, macs: int) -> None:
    """A finished run directory as vision.train writes it (summary.json, metrics.jsonl, config.yaml)."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "model": model}))
    summary = {
        "task": "vision",
        "model": model,
        "total_params": 1_000_000 + 500_000 * experts,
        "macs": macs,
        "img_size": 32,
        "num_classes": 10,
        "num_experts": experts,
        "iterations": 150,
        "epochs": 1.0,
        "seed": seed,
        "world_size": 1,
        "final_val_loss": 0.5,
        "top1": top1,
        "top5": 99.0,
        "train_loss": 0.6,
        "seconds": 60.0,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    records = [
        {"kind": "train", "iteration": 10, "loss": 1.0, "images_per_s": 100.0},
        {"kind": "valid", "iteration": 150, "val_loss": 0.5, "top1": top1, "top5": 99.0, "images": 10000},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_vision_report_on_hand_written_runs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "paper-vision"
    static, experts = [80.0, 81.0, 79.5], [81.0, 81.8, 80.7]  # differences +1.0, +0.8, +1.2
    for i, seed in enumerate((42, 43, 44)):
        fake_vision_run(out / "static" / f"seed{seed}", "ghostnet_tiny_os4", 0, seed, static[i], 2_000_000)
        fake_vision_run(out / "pn-e4" / f"seed{seed}", "parameternet_tiny_os4", 4, seed, experts[i], 2_120_000)
    (out / "pn-e2" / "seed42").mkdir(parents=True)  # interrupted: metrics only, no summary.json
    (out / "pn-e2" / "seed42" / "metrics.jsonl").write_text("")
    assert main(["report", str(out), "--experiment", "paper-vision"]) == 0
    report = (out / "report.md").read_text()
    d = [1.0, 0.8, 1.2]
    mean = sum(d) / 3
    half = 4.302652729911275 * math.sqrt(sum((x - mean) ** 2 for x in d) / 2) / math.sqrt(3)
    assert "| pn-e4 | ParameterNet: dynamic convolutions with 4 experts | 42, 43, 44 | 1.060x | " in report
    assert f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]" in report
    assert "the interval excludes 0" in report and "3.00x the parameters at 1.060x the multiply-adds" in report
    assert "pn-e2/seed42`: not finished" in report
    assert "Above the twin at the 5% level: pn-e4; below: none." in report
    assert "Every run trained 150 iterations (1 epoch) and was validated on 10000 images." in report
    data = json.loads((out / "report.json").read_text())
    assert data["paired_top1"]["pn-e4"]["per_seed"] == pytest.approx(d) and data["paired_top1"]["static"] is None
    capsys.readouterr()
    # refusals: a report.md someone else wrote is kept; no static twin, no report
    (out / "report.md").write_text("my notes\n")
    assert main(["report", str(out), "--experiment", "paper-vision"]) == 2
    assert "was not written by evals.experiment" in capsys.readouterr().err
    (out / "report.md").unlink()
    other = tmp_path / "no-static"
    fake_vision_run(other / "pn-e4" / "seed42", "parameternet_tiny_os4", 4, 42, 80.0, 2_120_000)
    assert main(["report", str(other), "--experiment", "paper-vision"]) == 2
    assert "no finished 'static' run" in capsys.readouterr().err
