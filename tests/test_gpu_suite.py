"""The GPU suite narrows instead of stopping (issue 35): the pre-flight's verdict per step, the summary computed from a
partial gpu_suite.jsonl, the memory plan's fallback, the one out-of-memory retry at half, the 1B models built on the
device, and the suite's budget - each through the code the GPU window runs, on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from benchmarks import gpu_report, gpu_train
from tests.test_gpu_env import wheel
from tests.trainer_utils import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_env  # noqa: E402  (a script of benchmarks/, not a package)


def train_line(model: str, tokens_per_s: float, micro: int = 8, **extra: object) -> dict[str, object]:
    line = {"suite": "gpu_suite", "step": "train", "model": model, "rc": 0, "tokens_per_s": tokens_per_s}
    line.update(micro_batch_size=micro, seq_len=2048, activation_checkpointing=False, **extra)
    return line


def write_jsonl(path: Path, records: list[dict[str, object]], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


# ------------------------------------------------------------------------------------------- the summary report
def test_the_summary_computes_the_ratio_from_a_partial_file(tmp_path: Path) -> None:
    """A suite killed mid-step: the last line is cut, the vision and tests lines never came; the two train lines
    still give the ratio, and the cut line is counted, not fatal."""
    records = [
        {"suite": "gpu_suite", "step": "probe", "rc": 0, "gpu_memory_gib": 79.2},
        {"suite": "gpu_suite", "step": "preflight_mismatch", "problem": "datasets needs pyarrow>=21", "blocks": []},
        train_line("llama-1b", 20000.0, mfu=0.41, target="MFU >= 0.45", meets_target=False),
        train_line("parameternet-llama-1b", 18500.0),
    ]
    path = write_jsonl(tmp_path / "gpu_suite.jsonl", records, tail='{"suite": "gpu_suite", "step": "moe_la')
    summary = gpu_report.summary(path)
    assert summary["ratio"]["parameternet_vs_llama_tokens_per_s"] == 0.925
    assert summary["ratio"]["meets_target"] is True
    assert summary["targets"] == {"train:llama-1b": False, "parameternet_vs_llama_tokens_per_s": True}
    assert summary["unreadable_lines"] == 1 and summary["mismatches"] == 1 and summary["failed_steps"] == []


def test_no_ratio_without_both_models_or_at_different_micro_batches(tmp_path: Path) -> None:
    failed_llama = {"suite": "gpu_suite", "step": "train", "model": "llama-1b", "rc": 124, "note": "timed out"}
    only_pnet = write_jsonl(tmp_path / "a.jsonl", [failed_llama, train_line("parameternet-llama-1b", 18000.0)])
    summary = gpu_report.summary(only_pnet)
    assert summary["ratio"] == {"note": "no ratio: no tokens/s of llama in the file"}
    assert summary["failed_steps"] == ["train:llama-1b"]
    retried = write_jsonl(
        tmp_path / "b.jsonl", [train_line("llama-1b", 20000.0), train_line("parameternet-llama-1b", 9000.0, micro=4)]
    )
    note = gpu_report.summary(retried)["ratio"]["note"]
    assert note.startswith("no ratio: the two runs differ in micro_batch_size 8 vs 4")


def test_the_summary_command_runs_on_a_partial_file(tmp_path: Path) -> None:
    """`python -m benchmarks.gpu_report summary FILE --append`, as the suite and a reader of $OUT run it."""
    path = write_jsonl(
        tmp_path / "gpu_suite.jsonl",
        [train_line("llama-1b", 100.0), train_line("parameternet-llama-1b", 80.0)],
        tail="not json\n",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_report", "summary", str(path), "--append"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["ratio"]["parameternet_vs_llama_tokens_per_s"] == 0.8 and printed["ratio"]["meets_target"] is False
    assert json.loads(path.read_text().splitlines()[-1]) == printed


# ------------------------------------------------------------------------------------- the pre-flight's verdict
def test_a_mismatch_blocks_only_the_steps_that_need_what_it_concerns(tmp_path: Path) -> None:
    """datasets (carried) against an old pyarrow, and no lm_eval: the 1B, MoE and vision steps stay ready, the tests
    run without those modules; a failed deepspeed import blocks what imports deepspeed, and nothing else."""
    wheel(tmp_path, "datasets", "5.2.0", "pyarrow>=21.0.0")
    wheel(tmp_path, "lm_eval", "0.4.13", "datasets>=2.16.0")
    wheels = gpu_env.read_wheels(tmp_path)
    active = {**gpu_env.machine_versions(), "pyarrow": Version("19.0.1")}
    active.pop("lm-eval", None)
    found = gpu_env.mismatches(wheels, active)
    assert any("pyarrow>=21.0.0; this machine has pyarrow 19.0.1" in line for line, _ in found)
    steps = gpu_env.step_readiness(wheels, found, {"lm_eval": "ModuleNotFoundError: No module named 'lm_eval'"})
    assert [name for name, s in steps.items() if s["ready"]] == ["train", "moe", "vision", "tests"]
    assert any("pyarrow" in why for why in steps["tests"]["runs_without"])
    assert "import lm_eval fails: ModuleNotFoundError: No module named 'lm_eval'" in steps["tests"]["runs_without"]
    steps = gpu_env.step_readiness(wheels, [], {"deepspeed": "ImportError: libcudart.so.12"})
    assert {name: s["ready"] for name, s in steps.items()} == {
        "train": False,
        "moe": True,
        "vision": True,
        "tests": False,
    }
    assert steps["train"]["why_not"] == ["import deepspeed fails: ImportError: libcudart.so.12"]


def test_check_records_each_mismatch_and_narrows_instead_of_stopping(tmp_path: Path) -> None:
    """The real command: a carried deepspeed that needs a numpy nobody has blocks the steps that import deepspeed
    (the 1B steps, the tests), one JSON line says so, and the command still exits 0 with the others ready."""
    wheel(tmp_path / "wheels", "deepspeed", "0.19.8", "numpy>=999")
    ready = tmp_path / "ready"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_env.py"), "check", str(tmp_path / "wheels")]
        + ["--device", "cpu", "--ready", str(ready)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    mismatch = [r for r in lines if r["step"] == "preflight_mismatch" and "numpy>=999" in r["problem"]]
    assert len(mismatch) == 1 and mismatch[0]["blocks"] == ["train", "tests"]
    preflight = lines[-1]
    assert preflight["step"] == "preflight" and preflight["rc"] == 0 and preflight["ready_steps"] == ["moe", "vision"]
    verdicts = dict(line.split("\t") for line in ready.read_text().splitlines())
    assert verdicts["moe"] == verdicts["vision"] == "ready"
    assert "numpy>=999" in verdicts["train"] and "numpy>=999" in verdicts["tests"]


# ---------------------------------------------------------------------------- the 1B step: plan, retry, on device
def test_the_plan_leaves_15_percent_free_and_falls_back_when_it_cannot_plan() -> None:
    plan = gpu_train.plan_micro_batch("1b", 2048, 79.2)
    assert plan.source == "planner" and plan.micro_batch == 8 and not plan.activation_checkpointing
    assert plan.planned_free_share is not None and min(plan.planned_free_share.values()) >= 0.15
    assert gpu_train.plan_micro_batch("1b", 2048, 139.8).micro_batch == gpu_train.MICRO_BATCH_CAP
    no_memory = gpu_train.plan_micro_batch("1b", 2048, None)
    assert no_memory.micro_batch == gpu_train.FALLBACK_MICRO_BATCH and no_memory.source.startswith("fallback: ")
    broken = gpu_train.plan_micro_batch("no-such-size", 2048, 79.2)  # the planner raises: the step still runs
    assert broken.micro_batch == gpu_train.FALLBACK_MICRO_BATCH and "the planner failed" in broken.source


def test_an_out_of_memory_retries_once_at_half_and_the_line_keeps_both_attempts() -> None:
    calls: list[int] = []
    figures = {"median_tokens_per_s": {"trainer_parameternet": 9000.0}, "micro_batch_size": 4, "seq_len": 2048}

    def attempt(micro: int, seconds_left: float) -> tuple[int, str]:
        calls.append(micro)
        if micro > 4:
            return gpu_train.OOM_EXIT, 'log\n{"benchmark": "train_throughput", "oom": true}\n'
        return 0, "log\n" + json.dumps(figures, indent=2) + "\n"

    deadline = gpu_train.time.monotonic() + 100
    attempts = gpu_train.measure(8, deadline, attempt)
    assert calls == [8, 4] and [a.oom for a in attempts] == [True, False]
    plan = gpu_train.Plan(8, False, "planner")
    line = gpu_train.record("parameternet", "1b", plan, attempts, 100, smoke=False)
    assert line["tokens_per_s"] == 9000.0 and line["micro_batch_size"] == 4 and line["rc"] == 0
    assert [a["micro_batch"] for a in line["attempts"]] == [8, 4]
    calls.clear()  # out of memory at half too: no third attempt, and the line says there are no figures
    attempts = gpu_train.measure(16, gpu_train.time.monotonic() + 100, attempt)
    assert calls == [16, 8]
    assert gpu_train.record("llama", "1b", plan, attempts, 100, smoke=False)["note"].startswith("no figures: exit 3")
    calls.clear()  # a timeout is not an out-of-memory: no retry
    assert (
        len(gpu_train.measure(8, gpu_train.time.monotonic() + 100, lambda m, s: (calls.append(m), (124, ""))[1])) == 1
    )


def test_train_throughput_turns_an_out_of_memory_into_one_line_and_exit_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What gpu_train.py retries on: torch's OutOfMemoryError, or a library's "CUDA error: out of memory"; any other
    error stays an error."""
    from benchmarks import train_throughput

    argv = ["train_throughput.py", "--size", "1b", "--micro_batch_size", "8", "--global_batch_size", "8"]
    monkeypatch.setattr(sys, "argv", [*argv, "--kinds", "parameternet"])
    for error in (torch.OutOfMemoryError("CUDA out of memory. Tried"), RuntimeError("CUDA error: out of memory")):

        def run(args: object, error: Exception = error) -> None:
            raise error

        monkeypatch.setattr(train_throughput, "run", run)
        with pytest.raises(SystemExit) as exited:
            train_throughput.main()
        assert exited.value.code == gpu_train.OOM_EXIT == train_throughput.OOM_EXIT
        line = json.loads(capsys.readouterr().out)
        assert line["oom"] is True and line["micro_batch_size"] == 8 and line["kinds"] == ["parameternet"]

    def broken(args: object) -> None:
        raise RuntimeError("expected all tensors to be on the same device")

    monkeypatch.setattr(train_throughput, "run", broken)
    with pytest.raises(RuntimeError, match="same device"):
        train_throughput.main()


def test_the_model_built_on_the_device_is_the_model_built_on_the_cpu() -> None:
    """build_model(device=...) creates every tensor there (the 1B steps' path, here with the CPU as the device): the
    same parameters and buffers, router_loss_scale included, as the plain build (meta + to_empty would lose it)."""
    from llm.model import load_model_config
    from llm.train.build import build_model
    from llm.train.config import load_config

    cfg = load_config(None, overrides={"model": "parameternet-llama-tiny", "train_iters": 1})
    plain, _, _ = build_model(cfg, load_model_config(cfg.model), 1, 0)
    on_device, _, _ = build_model(cfg, load_model_config(cfg.model), 1, 0, device="cpu")
    expected = {**dict(plain.named_parameters()), **dict(plain.named_buffers())}
    got = {**dict(on_device.named_parameters()), **dict(on_device.named_buffers())}
    assert expected.keys() == got.keys() and any("router_loss_scale" in k for k in got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_the_1b_step_program_measures_a_tiny_model_without_datasets(tmp_path: Path) -> None:
    """benchmarks/gpu_train.py end to end on CPU: plan, child train_throughput.py on synthetic tokens with the model
    built on the device, one JSON line with the figures; datasets is never imported (the 1B steps need it not)."""
    jsonl = tmp_path / "gpu_suite.jsonl"
    command = [sys.executable, "-X", "importtime", "-m", "benchmarks.gpu_train", "llama", "--jsonl", str(jsonl)]
    command += ["--limit", "500", "--size", "tiny", "--seq_len", "32", "--gpu_memory_gib", "4", "--cap", "2"]
    command += ["--smoke", "--", "--rounds", "1", "--steps", "1", "--peak_tflops", "1"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(jsonl.read_text())
    assert line["model"] == "llama-tiny" and line["rc"] == 0 and line["tokens_per_s"] > 0, line
    assert line["synthetic_data"] is True and line["built_on"] == "cpu" and line["micro_batch_size"] == 2


# ----------------------------------------------------------------------------------- the suite: verdicts, budget
def run_suite(tmp_path: Path, wheels: Path, **env: str) -> list[dict[str, object]]:
    """GPU_SUITE_SMOKE=1 bash benchmarks/gpu_suite.sh with this python; its JSON lines."""
    full = {**os.environ, "GPU_SUITE_SMOKE": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    full.update(GPU_SUITE_WHEELS=str(wheels), GPU_SUITE_SITE=str(tmp_path / "site"), **env)
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True, timeout=600, env=full
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / "out" / "gpu_suite.jsonl").read_text().splitlines()]


def test_the_suite_skips_a_blocked_step_with_the_pre_flights_reason(tmp_path: Path) -> None:
    """A carried deepspeed that needs a numpy nobody has: the 1B step does not start, its line says why, and the
    suite goes on to its summary."""
    wheel(tmp_path / "wheels", "deepspeed", "0.19.8", "numpy>=999")
    lines = run_suite(tmp_path, tmp_path / "wheels", GPU_SUITE_STEPS="train")
    skipped = [r for r in lines if r["step"] == "skipped"]
    assert [r["what"] for r in skipped] == ["train"] and "numpy>=999" in str(skipped[0]["why"])
    assert not [r for r in lines if r["step"] == "train"]
    assert lines[-1]["step"] == "summary" and lines[-1]["skipped_steps"][0].startswith("train: deepspeed 0.19.8")


def test_the_suite_skips_with_a_reason_when_its_budget_is_spent(tmp_path: Path) -> None:
    """gpu_suite.sh with a 1 s budget: the probe and the pre-flight are cut short, which stops nothing; each step
    then says it had no time, and the summary line comes all the same."""
    lines = run_suite(tmp_path, tmp_path / "no-wheels", GPU_SUITE_BUDGET="1", GPU_SUITE_STEPS="moe vision")
    skipped = {r["what"]: r["why"] for r in lines if r["step"] == "skipped"}
    assert skipped == {"moe": "no time left in the 1s budget", "vision": "no time left in the 1s budget"}
    assert lines[-1]["step"] == "summary" and lines[-1]["smoke"] is True
