"""Zero-shot evaluation and the comparison report on tiny trained models of both kinds (vanilla, ParameterNet).

The run directories follow the trainer's contract (config.yaml, metrics.jsonl, summary.json, hf/); the models in them
are really trained for a few steps on Shakespeare here, so these tests do not wait on the trainer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from evals.compare import compare
from evals.suite import LLAMA_ZERO_SHOT, TASKS_DIR
from evals.zero_shot import ZeroShotOutput, run_zero_shot
from llm.data.corpus import shakespeare_files
from llm.data.tokenizer import load_tokenizer, train_tokenizer
from llm.model import build_model, load_model_config
from llm.model.flops import account

REPO = Path(__file__).resolve().parents[1]
LIMIT = 3  # documents per task
SEQ, BATCH, STEPS = 64, 4, 4
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(shakespeare_files()[:8], 8000, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def token_data(tokenizer_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tok = load_tokenizer(tokenizer_dir)
    files = shakespeare_files()
    train = torch.tensor(tok(files[0].read_text(encoding="utf-8"))["input_ids"])
    valid = torch.tensor(tok(files[1].read_text(encoding="utf-8"))["input_ids"][:20_000])
    return train, valid


def _batch(data: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=gen)
    return torch.stack([data[s : s + SEQ] for s in starts.tolist()])


def _lm_loss(out: object) -> float:
    lm_loss = getattr(out, "lm_loss", None)
    return (lm_loss if lm_loss is not None else out.loss).item()  # type: ignore[attr-defined]


def make_run(
    run_dir: Path,
    preset: str,
    seed: int,
    tokenizer_dir: Path,
    data: tuple[torch.Tensor, torch.Tensor],
    steps: int = STEPS,
) -> Path:
    """Train `preset` for a few steps and write a run directory as the trainer does."""
    train, valid = data
    torch.manual_seed(seed)
    config = load_model_config(preset)
    model = build_model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data_gen = torch.Generator().manual_seed(seed)  # same data order for both kinds at one seed
    valid_batch = _batch(valid, torch.Generator().manual_seed(0))
    lines = []
    for it in range(1, steps + 1):
        x = _batch(train, data_gen)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        aux = getattr(out, "aux_loss", None)  # ParameterNet reports lm_loss and the router's aux loss apart
        lines.append(
            {
                "kind": "train",
                "iteration": it,
                "tokens": it * BATCH * SEQ,
                "lm_loss": _lm_loss(out),
                "aux_loss": 0.0 if aux is None else aux.item(),
                "lr": 3e-3,
            }
        )
        if it % 2 == 0:
            with torch.no_grad():
                val_loss = _lm_loss(model(input_ids=valid_batch, labels=valid_batch))
            lines.append(
                {
                    "kind": "valid",
                    "iteration": it,
                    "tokens": it * BATCH * SEQ,
                    "val_loss": val_loss,
                    "val_ppl": math.exp(val_loss),
                }
            )
    run_dir.mkdir(parents=True)
    model.save_pretrained(run_dir / "hf")
    load_tokenizer(tokenizer_dir).save_pretrained(run_dir / "hf")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": preset, "seed": seed, "seq_len": SEQ}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    acc = account(config, SEQ)
    summary = {
        "model": preset,
        "total_params": acc.total_params,
        "active_params": acc.active_params,
        "flops_per_token": acc.forward_flops_per_token,
        "seq_len": SEQ,
        "final_val_loss": lines[-1]["val_loss"],
        "tokens": steps * BATCH * SEQ,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, token_data: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "llama": make_run(root / "llama", "llama-tiny", 1, tokenizer_dir, token_data),
        "parameternet": make_run(root / "parameternet", "parameternet-llama-tiny", 1, tokenizer_dir, token_data),
    }


@pytest.fixture(scope="module")
def evaluated(runs: dict[str, Path]) -> dict[str, ZeroShotOutput]:
    return {name: run_zero_shot(run, offline=True, limit=LIMIT, batch_size=16) for name, run in runs.items()}


def test_offline_suite_on_both_models(runs: dict[str, Path], evaluated: dict[str, ZeroShotOutput]) -> None:
    config = json.loads((runs["parameternet"] / "hf" / "config.json").read_text())
    assert "auto_map" in config  # loaded by lm-eval's `hf` model through trust_remote_code, not our import
    expected = {b.offline_task for b in LLAMA_ZERO_SHOT}
    for name, out in evaluated.items():
        assert out.model_dir == runs[name] / "hf"
        assert out.results_json.parent == runs[name] / "eval" / "results"  # every evaluation is kept there
        assert out.headline_json == runs[name] / "eval" / "results.json"  # the only one so far is the headline
        assert out.headline_json.read_bytes() == out.results_json.read_bytes()
        saved = json.loads(out.results_json.read_text())
        assert set(saved["results"]) == expected
        assert {t: n["effective"] for t, n in saved["n-samples"].items()} == {t: LIMIT for t in expected}
        for task, values in saved["results"].items():
            assert 0.0 <= values["acc,none"] <= 1.0
            assert ("acc_norm,none" in values) == (
                task.removesuffix("_offline") in {"arc_easy", "arc_challenge", "hellaswag", "openbookqa", "piqa"}
            )
        assert saved["evals"]["offline"] is True
        md = out.results_md.read_text()
        assert all(b.name in md for b in LLAMA_ZERO_SHOT) and "**Average**" in md


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
        return img.size


def test_compare_report_two_models(runs: dict[str, Path], evaluated: dict[str, ZeroShotOutput], tmp_path: Path) -> None:
    out, table = compare([runs["llama"], runs["parameternet"]], tmp_path / "cmp")
    report = (out / "report.md").read_text()
    assert table in report
    header = table.splitlines()[0]
    assert "| llama | parameternet | Δ parameternet − llama |" in header
    for b in LLAMA_ZERO_SHOT:
        assert f"| {b.name} | {b.primary_metric} |" in table
    data = json.loads((out / "results.json").read_text())
    base, other = data["groups"]
    for task in [*data["tasks"], "Average"]:
        d = other["delta_vs_baseline"][task]["delta"]
        assert d == pytest.approx(other["accuracy"][task]["mean"] - base["accuracy"][task]["mean"])
    saved = json.loads(evaluated["parameternet"].results_json.read_text())["results"]
    assert other["accuracy"]["piqa"]["mean"] == saved["piqa_offline"]["acc_norm,none"]
    # ParameterNet: more parameters, the same FLOPs per token up to the router.
    assert other["total_params"] > 1.5 * base["total_params"]
    assert other["active_params"] == pytest.approx(base["active_params"], rel=0.02)
    assert other["flops_per_token"] == pytest.approx(base["flops_per_token"], rel=0.02)
    assert (
        other["final_val_loss"]["mean"]
        == json.loads((runs["parameternet"] / "summary.json").read_text())["final_val_loss"]
    )
    assert "Final validation loss" in report and "Total parameters" in report
    for png in ("accuracy.png", "loss.png"):
        width, height = _png(out / png)
        assert width > 300 and height > 200


def test_compare_with_seeds_reports_mean_and_std(
    runs: dict[str, Path], tmp_path: Path, tokenizer_dir: Path, token_data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    groups = {}
    for name, preset in (("llama", "llama-tiny"), ("parameternet", "parameternet-llama-tiny")):
        group = tmp_path / "seeds" / name
        shutil.copytree(runs[name], group / "seed1", ignore=shutil.ignore_patterns("eval"))
        make_run(group / "seed2", preset, 2, tokenizer_dir, token_data, steps=2)
        groups[name] = group
    out, table = compare(
        [groups["llama"], groups["parameternet"]],
        tmp_path / "cmp",
        evaluate=True,
        eval_kwargs={"tasks": "arc_easy,piqa", "limit": 2, "offline": True, "batch_size": 16},
    )
    data = json.loads((out / "results.json").read_text())
    assert data["tasks"] == ["arc_easy", "piqa"]
    for group in data["groups"]:
        assert len(group["runs"]) == 2 and group["seeds"] == [1, 2]
        for task in ["arc_easy", "piqa", "Average"]:
            per_seed = [row[task] for row in group["accuracy_per_seed"]]
            stat = group["accuracy"][task]
            assert stat["n"] == 2
            assert stat["mean"] == pytest.approx(statistics.fmean(per_seed))
            assert stat["std"] == pytest.approx(statistics.stdev(per_seed))
    a, b = (g["accuracy"]["Average"] for g in data["groups"])
    se = data["groups"][1]["delta_vs_baseline"]["Average"]["stderr"]
    assert se == pytest.approx(math.sqrt(a["std"] ** 2 / 2 + b["std"] ** 2 / 2))
    assert "(2 seeds)" in (out / "report.md").read_text()
    assert "±" in table.splitlines()[2]  # cells carry the spread over seeds
    _png(out / "accuracy.png")
    _png(out / "loss.png")


def test_lm_eval_cli_evaluates_parameternet_through_include_path(runs: dict[str, Path], tmp_path: Path) -> None:
    """The plain lm-eval CLI, run from elsewhere, finds the offline tasks and the ParameterNet code by itself."""
    model_dir = runs["parameternet"] / "hf"
    cmd = [
        str(Path(sys.executable).parent / "lm_eval"),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},trust_remote_code=True,dtype=float32",
        "--device",
        "cpu",
        "--tasks",
        "arc_easy_offline",
        "--include_path",
        str(TASKS_DIR),
        "--limit",
        "2",
        "--batch_size",
        "8",
        "--output_path",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=OFFLINE_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(result_file.read_text())["results"]
    assert set(results) == {"arc_easy_offline"}
    assert "arc_easy_offline" in proc.stdout and "acc_norm" in proc.stdout


def test_unknown_task_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task 'arc_hard'.*arc_easy"):
        run_zero_shot(runs["llama"], tasks="arc_easy,arc_hard", offline=True, output_dir=tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "evals.zero_shot", "--model", str(runs["llama"]), "--tasks", "arc_hard", "--offline"],
        cwd=REPO,
        env=OFFLINE_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown task 'arc_hard'" in proc.stderr


def test_missing_model_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory"):
        run_zero_shot(tmp_path / "nope", offline=True)


def test_model_without_tokenizer_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(runs["llama"] / "hf", bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(FileNotFoundError, match="has no tokenizer.*--tokenizer"):
        run_zero_shot(bare, offline=True, output_dir=tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_compare_refuses_unevaluated_and_mismatched_runs(
    runs: dict[str, Path], evaluated: dict[str, ZeroShotOutput], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="at least two runs"):
        compare([runs["llama"]], tmp_path / "cmp")
    fresh = tmp_path / "fresh"
    shutil.copytree(runs["llama"], fresh, ignore=shutil.ignore_patterns("eval"))
    with pytest.raises(FileNotFoundError, match="has not been evaluated.*--evaluate"):
        compare([runs["llama"], fresh], tmp_path / "cmp")
    (fresh / "eval").mkdir()
    saved = json.loads(evaluated["llama"].results_json.read_text())
    del saved["results"]["piqa_offline"]
    (fresh / "eval" / "results.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="evaluated on tasks"):
        compare([runs["llama"], fresh], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()
