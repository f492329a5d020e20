"""evals.compare on vision runs: hand-written run directories that follow runtime.rundir's contract exactly
(config.yaml, metrics.jsonl through runtime.metrics, summary.json through write_summary), so every number in the report
can be checked against what the runs hold."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from evals.compare import compare, main
from runtime.metrics import MetricsLogger
from runtime.rundir import write_config, write_summary
from tests.trainer_utils import REPO, tiny_image_folder, tiny_vision_args

IMAGES = 400  # validation images
STEPS_PER_EPOCH = 10


def write_vision_run(
    run: Path,
    model: str,
    seed: int,
    top1: float,
    top5: float,
    *,
    macs: int = 5_000_000,
    params: int = 1_000_000,
    experts: int | None = None,
    epochs: int = 2,
    ema: bool = False,
    num_classes: int = 10,
    images: int = IMAGES,
    offset: float = 0.0,
) -> Path:
    """A finished vision.train run: train records every 5 steps, a validation at the end of every epoch."""
    iterations = epochs * STEPS_PER_EPOCH
    write_config(run, {"model": model, "seed": seed, "epochs": epochs, "img_size": 32})
    logger = MetricsLogger(run, enabled=True, tensorboard=False)
    val_loss = 0.0
    for it in range(5, iterations + 1, 5):
        epoch = (it - 1) // STEPS_PER_EPOCH
        loss = 2.3 - 0.05 * it + offset
        logger.log(
            {"kind": "train", "iteration": it, "epoch": epoch, "loss": loss, "lr": 1e-3, "images_per_s": 100.0 * it}
        )
        if it % STEPS_PER_EPOCH == 0:
            last = it == iterations
            val_loss = 2.0 - 0.04 * it + offset
            record = {
                "kind": "valid",
                "iteration": it,
                "epoch": epoch + 1,
                "val_loss": val_loss,
                "top1": top1 if last else top1 / 2,
                "top5": top5 if last else top5 / 2,
                "images": images,
            }
            if ema:
                record.update(ema_top1=top1 + 1 if last else top1, ema_top5=top5 if last else top5 / 2)
            logger.log(record)
    logger.close()
    summary: dict[str, Any] = {
        "task": "vision", "model": model, "total_params": params, "macs": macs, "img_size": 32,
        "num_classes": num_classes, "num_experts": experts, "iterations": iterations, "epochs": epochs,
        "seed": seed, "world_size": 1, "final_val_loss": val_loss, "top1": top1, "top5": top5,
        "train_loss": 2.3 - 0.05 * iterations + offset, "seconds": 12.5 + seed,
    }  # fmt: skip
    if ema:
        summary.update(ema_top1=top1 + 1, ema_top5=top5)
    write_summary(run, summary)
    return run


def write_llm_run(run: Path) -> Path:
    write_config(run, {"model": "llama-tiny", "seed": 1})
    logger = MetricsLogger(run, enabled=True, tensorboard=False)
    logger.log({"kind": "train", "iteration": 1, "tokens": 64, "lm_loss": 9.0})
    logger.log({"kind": "valid", "iteration": 1, "tokens": 64, "val_loss": 9.1, "val_ppl": math.exp(9.1)})
    logger.close()
    write_summary(
        run,
        {
            "task": "llm",
            "model": "llama-tiny",
            "total_params": 1000,
            "iterations": 1,
            "seed": 1,
            "world_size": 1,
            "final_val_loss": 9.1,
            "active_params": 1000,
            "flops_per_token": 6000,
            "tokens": 64,
        },
    )
    return run


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def test_two_single_seed_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    static = write_vision_run(tmp_path / "ghostnet_tiny", "ghostnet_tiny", 0, 70.25, 95.5)
    dynamic = write_vision_run(
        tmp_path / "parameternet_tiny",
        "parameternet_tiny",
        0,
        74.0,
        97.25,
        macs=5_100_000,
        params=2_600_000,
        experts=4,
        offset=-0.1,
    )
    out = tmp_path / "compare"
    assert main([str(static), str(dynamic), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png",
        "loss.png",
        "parameternet_compare.json",
        "report.md",
        "results.json",
    ]
    data = json.loads((out / "results.json").read_text())
    assert data["task"] == "vision" and data["baseline"] == "ghostnet_tiny" and data["metrics"] == ["top1", "top5"]
    base, other = data["groups"]
    for group, run in ((base, static), (other, dynamic)):
        summary = _summary(run)
        for key in ("top1", "top5"):
            assert group["accuracy"][key] == {
                "mean": summary[key],
                "std": None,
                "n": 1,
                "sem": pytest.approx(100 * math.sqrt(summary[key] / 100 * (1 - summary[key] / 100) / IMAGES)),
            }
        for key in ("total_params", "macs", "img_size", "num_classes", "num_experts"):
            assert group[key] == summary[key]
        assert group["final_val_loss"]["mean"] == summary["final_val_loss"]
        assert group["train_loss"]["mean"] == summary["train_loss"]
        assert group["seconds"]["mean"] == summary["seconds"]
        assert group["iterations"] == [summary["iterations"]] and group["epochs"] == [summary["epochs"]]
        assert group["seeds"] == [0] and group["val_images"] == IMAGES
        # images/s: the logged intervals after the first (start-up), here 1000, 1500, 2000
        assert group["images_per_s"]["mean"] == pytest.approx(1500.0)
    d = other["delta_vs_baseline"]["top1"]
    assert d["delta"] == pytest.approx(74.0 - 70.25)
    assert d["stderr"] == pytest.approx(math.hypot(base["accuracy"]["top1"]["sem"], other["accuracy"]["top1"]["sem"]))
    assert other["macs_vs_baseline"] == pytest.approx(1.02) and other["params_vs_baseline"] == pytest.approx(2.6)

    report = (out / "report.md").read_text()
    table = printed.split("report: ")[0]
    assert "| Metric | ghostnet_tiny | parameternet_tiny | Δ parameternet_tiny − ghostnet_tiny |" in table
    assert "| Top-1 | 70.25 | 74.00 | +3.75 ± 3.17 |" in table  # 3.75 < 2 x 3.17: no star
    assert "| Top-5 | 95.50 | 97.25 | +1.75 ± 1.32 |" in table
    assert "| MACs per image | 5.00 M | 5.10 M (1.02x the multiply-adds) |" in table
    assert "| Total parameters | 1.00 M | 2.60 M (2.60x the parameters) |" in table
    assert "| Experts | - | 4 |" in table and "| Iterations | 20 | 20 |" in table and "| Epochs | 2 | 2 |" in table
    assert f"| Final validation loss | {_summary(static)['final_val_loss']:.4f} |" in table
    assert table.strip() in report.replace(
        "\n![accuracy](accuracy.png)\n\n## Models\n\nMACs: multiply-adds of one "
        "forward pass of one image at the run's image size.\n",
        "",
    )
    assert f"on {IMAGES} validation images" in report and "binomial" in report
    for png in ("accuracy.png", "loss.png"):
        width, height = _png_size(out / png)
        assert width > 300 and height > 200
    # A second call replaces its own report.
    assert main([str(static), str(dynamic), "--out", str(out)]) == 0


def test_seed_groups_report_mean_std_and_the_ema_rows(tmp_path: Path) -> None:
    top1 = {"ghostnet_tiny": [70.0, 72.0, 71.0], "parameternet_tiny": [75.0, 74.0, 78.0]}
    for model, values in top1.items():
        for seed, value in enumerate(values, 1):
            write_vision_run(tmp_path / model / f"seed{seed}", model, seed, value, 96.0 + seed / 4, ema=True)
    out, table = compare([tmp_path / "ghostnet_tiny", tmp_path / "parameternet_tiny"], tmp_path / "cmp")
    data = json.loads((out / "results.json").read_text())
    assert data["metrics"] == ["top1", "top5", "ema_top1", "ema_top5"]
    other = data["groups"][1]
    for group, values in zip(data["groups"], top1.values()):
        assert group["seeds"] == [1, 2, 3] and group["iterations"] == [20, 20, 20]
        assert [row["top1"] for row in group["accuracy_per_seed"]] == values
        stat = group["accuracy"]["top1"]
        assert stat["mean"] == pytest.approx(statistics.fmean(values)) and stat["n"] == 3
        assert stat["std"] == pytest.approx(statistics.stdev(values))
        assert group["accuracy"]["ema_top1"]["mean"] == pytest.approx(statistics.fmean(values) + 1)
        assert group["seconds"]["mean"] == pytest.approx(14.5)
    se = other["delta_vs_baseline"]["top1"]["stderr"]
    expected_se = math.sqrt(
        statistics.stdev(top1["ghostnet_tiny"]) ** 2 / 3 + statistics.stdev(top1["parameternet_tiny"]) ** 2 / 3
    )
    assert se == pytest.approx(expected_se)
    assert "| Top-1 | 71.00 ± 1.00 | 75.67 ± 2.08 | +4.67 ± 1.33 * |" in table
    assert "| EMA top-1 | 72.00 ± 1.00 | 76.67 ± 2.08 |" in table
    assert "| Seeds | 1, 2, 3 | 1, 2, 3 |" in table
    assert "mean ± standard deviation over seeds" in (out / "report.md").read_text()


def test_ema_rows_only_when_every_run_has_an_ema(tmp_path: Path) -> None:
    a = write_vision_run(tmp_path / "a", "ghostnet_tiny", 0, 70.0, 95.0, ema=True)
    b = write_vision_run(tmp_path / "b", "parameternet_tiny", 0, 71.0, 95.0)
    _, table = compare([a, b], tmp_path / "cmp")
    assert "| Top-1 |" in table and "EMA" not in table


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_refusals_name_the_problem_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vision = write_vision_run(tmp_path / "runs" / "ghostnet_tiny", "ghostnet_tiny", 0, 70.0, 95.0)
    other = write_vision_run(tmp_path / "runs" / "parameternet_tiny", "parameternet_tiny", 0, 71.0, 95.0)
    llm = write_llm_run(tmp_path / "llama")
    out = str(tmp_path / "cmp")
    _refused([str(vision), str(llm), "--out", out], capsys, "cannot compare LLM runs", str(llm), str(vision))
    _refused([str(llm), str(vision), "--out", out], capsys, "cannot compare LLM runs")
    _refused(
        [str(vision), str(other), "--evaluate", "--out", out], capsys, "--evaluate", "vision runs", "drop --evaluate"
    )
    # A directory holding runs of two models is not a group of seeds.
    _refused([str(tmp_path / "runs"), str(other), "--out", out], capsys, "different models")

    unfinished = tmp_path / "unfinished"  # metrics, no summary.json: a vision run by the shape of its records
    MetricsLogger(unfinished, enabled=True, tensorboard=False).log(
        {"kind": "train", "iteration": 1, "epoch": 0, "loss": 2.0, "lr": 1e-3, "images_per_s": 10.0}
    )
    _refused([str(vision), str(unfinished), "--out", out], capsys, "summary.json does not exist", "finish")

    other_set = write_vision_run(tmp_path / "ten_images", "parameternet_tiny", 0, 71.0, 95.0, images=10)
    _refused([str(vision), str(other_set), "--out", out], capsys, "val_images=10", "val_images=400")
    other_classes = write_vision_run(tmp_path / "classes", "parameternet_tiny", 0, 71.0, 95.0, num_classes=100)
    _refused([str(vision), str(other_classes), "--out", out], capsys, "num_classes=100", "same dataset")

    stale = write_vision_run(tmp_path / "stale", "parameternet_tiny", 0, 71.0, 95.0)
    summary = _summary(stale)
    del summary["top5"]
    (stale / "summary.json").write_text(json.dumps(summary))
    _refused([str(vision), str(stale), "--out", out], capsys, "lacks ['top5']")
    summary["task"] = "audio"
    (stale / "summary.json").write_text(json.dumps(summary))
    _refused([str(vision), str(stale), "--out", out], capsys, "task='audio'", "llm, vision")
    assert not (tmp_path / "cmp").exists()


def test_a_skipped_step_is_left_out_of_the_curves(tmp_path: Path) -> None:
    from evals.runs import load_group

    run = write_vision_run(tmp_path / "run", "ghostnet_tiny", 0, 70.0, 95.0)
    with (run / "metrics.jsonl").open("a") as f:  # the trainer logs a non-finite loss as null
        f.write(
            json.dumps({"kind": "train", "iteration": 21, "epoch": 2, "loss": None, "lr": 1e-3, "images_per_s": 5.0})
            + "\n"
        )
    group = load_group(run)
    assert group.task == "vision" and group.runs[0].train_loss_key == "loss"
    assert [r["iteration"] for r in group.runs[0].train] == [5, 10, 15, 20]
    assert [r["iteration"] for r in group.runs[0].valid] == [10, 20]


def test_report_of_two_real_vision_runs_equals_their_summaries(tmp_path: Path) -> None:
    """vision.train, two iterations of each model on a tiny ImageFolder (the smallest settings the vision tests
    use), then `python -m evals.compare` on the two run directories: every reported number is the run's own."""
    images = tiny_image_folder(tmp_path / "images")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    runs = {}
    for model in ("ghostnet_tiny", "parameternet_tiny"):
        runs[model] = tmp_path / "runs" / model
        args = tiny_vision_args(model=model, data_dir=images, output_dir=runs[model])
        proc = subprocess.run(
            [sys.executable, "-m", "vision.train", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "compare"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "evals.compare",
            str(runs["ghostnet_tiny"]),
            str(runs["parameternet_tiny"]),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    base, other = data["groups"]
    assert [g["label"] for g in data["groups"]] == ["ghostnet_tiny", "parameternet_tiny"]
    for group, run in ((base, runs["ghostnet_tiny"]), (other, runs["parameternet_tiny"])):
        summary = _summary(run)
        assert summary["task"] == "vision" and group["model"] == summary["model"]
        assert group["accuracy"]["top1"]["mean"] == summary["top1"]
        assert group["accuracy"]["top5"]["mean"] == summary["top5"]
        for key in ("total_params", "macs", "img_size", "num_classes", "num_experts"):
            assert group[key] == summary[key], key
        for key in ("final_val_loss", "train_loss", "seconds"):
            assert group[key]["mean"] == summary[key], key
        assert group["iterations"] == [summary["iterations"]] == [2]
        assert group["epochs"] == [summary["epochs"]] and group["seeds"] == [summary["seed"]]
        assert group["val_images"] == 8
    b, o = _summary(runs["ghostnet_tiny"]), _summary(runs["parameternet_tiny"])
    assert other["delta_vs_baseline"]["top1"]["delta"] == pytest.approx(o["top1"] - b["top1"])
    assert other["macs_vs_baseline"] == pytest.approx(o["macs"] / b["macs"])
    assert other["params_vs_baseline"] == pytest.approx(o["total_params"] / b["total_params"])
    # ParameterNet has more parameters than its static twin (at 32x32, 1 channel, 2 classes its routing's share of
    # the multiply-adds is large: no claim about MACs here).
    assert other["num_experts"] == 4 and not base["num_experts"]  # the static twin: 0 or none
    assert other["params_vs_baseline"] > 1.2
    table = proc.stdout
    assert f"| Top-1 | {b['top1']:.2f} | {o['top1']:.2f} | {o['top1'] - b['top1']:+.2f} ± " in table
    assert f"({o['macs'] / b['macs']:.2f}x the multiply-adds)" in table and "| Experts | - | 4 |" in table
    assert table.split("report: ")[0].strip() in (out / "report.md").read_text().replace(
        "\n![accuracy](accuracy.png)\n\n## Models\n\nMACs: multiply-adds of one forward pass of one image at the "
        "run's image size.\n",
        "",
    )
    for png in ("accuracy.png", "loss.png"):
        width, height = _png_size(out / png)
        assert width > 300 and height > 200
