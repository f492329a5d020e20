"""evals.plot_routing: expert-load heat maps from a run's metrics.jsonl (written here in the trainer's format)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from evals.plot_routing import load_routing, main, plot_routing
from llm.train.records import expert_load

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["layers.0.down_proj", "layers.1.down_proj", "layers.2.down_proj"]


def train_record(iteration: int, counts: list[list[int]]) -> dict:
    """A train record as the trainer writes it (llm/train/trainer.py _log_train)."""
    record = {
        "kind": "train",
        "iteration": iteration,
        "tokens": iteration * 128,
        "lm_loss": 5.0,
        "aux_loss": 1.01,
        "z_loss": 0.0,
        "dropped_tokens": 3,
        "expert_counts": counts,
    }
    record.update(expert_load(torch.tensor(counts), LAYERS))
    return record


def write_run(run_dir: Path, records: list[dict], tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run_dir


@pytest.fixture
def run_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    records = []
    for it in range(1, 41):
        counts = rng.integers(10, 40, size=(3, 8))
        counts[2, 5] = 0  # layer 2, expert 5 never chosen
        counts[1, 0] = 200  # layer 1, expert 0 takes most tokens
        records.append(train_record(it, counts.tolist()))
        if it % 10 == 0:
            records.append({"kind": "valid", "iteration": it, "val_loss": 4.0})
    # A resumed run re-logs iterations 31..40: the later records win.
    resumed = [train_record(it, [[16] * 8] * 3) for it in range(31, 41)]
    return write_run(tmp_path / "run", records + resumed, tail='{"kind": "train", "itera')  # cut by a kill


def test_load_routing_reads_the_trainer_records(run_dir):
    history = load_routing(run_dir / "metrics.jsonl")
    assert history.layer_names == LAYERS
    assert history.iterations.tolist() == list(range(1, 41))
    assert history.counts.shape == (40, 3, 8)
    np.testing.assert_allclose(history.shares.sum(-1), 1.0)
    assert (history.shares[:30, 2, 5] == 0).all()
    assert (history.shares[:30, 1, 0] > 0.4).all()
    np.testing.assert_allclose(history.shares[30:], 1 / 8)  # the resumed records replaced the first ones
    # The CV is the trainer's own figure.
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    np.testing.assert_allclose(history.cv[0], [first[f"moe/{n}/cv"] for n in LAYERS])
    np.testing.assert_allclose(history.cv[30:], 0.0)


def test_plot_writes_a_png_heat_map(run_dir, tmp_path):
    out = plot_routing(run_dir, tmp_path / "plots" / "routing.png")
    assert out == tmp_path / "plots" / "routing.png"
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert width > 600 and height > 400
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # heat maps drawn, not a blank canvas
    assert not list(out.parent.glob("*.tmp"))


def test_cli_default_output_and_single_record(tmp_path):
    run = write_run(tmp_path / "one", [train_record(7, [[5, 3, 0, 8]] * 3)])
    proc = subprocess.run(
        [sys.executable, "-m", "evals.plot_routing", str(run)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == run / "routing.png"
    with Image.open(run / "routing.png") as image:
        assert image.format == "PNG"


def test_clear_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        plot_routing(empty)

    dense = write_run(tmp_path / "dense", [{"kind": "train", "iteration": 1, "lm_loss": 5.0}])
    with pytest.raises(ValueError, match="no train records with 'expert_counts'"):
        plot_routing(dense)
    assert main([str(dense)]) == 2
    assert "no MoE layers" in capsys.readouterr().err

    mixed = write_run(tmp_path / "mixed", [train_record(1, [[1, 2]] * 3), train_record(2, [[1, 2, 3, 4]] * 3)])
    with pytest.raises(ValueError, match="iteration 2 has expert_counts of shape"):
        plot_routing(mixed)
    assert not (mixed / "routing.png").exists()


def test_a_plot_from_before_the_move_is_redrawn_a_foreign_png_is_not(tmp_path):
    """routing.png files drawn when the tool was llm.plot_routing are ours: the default output replaces them."""
    run = write_run(tmp_path / "run", [train_record(1, [[3, 5, 0, 8]] * 3)])
    for software, replaced in (("llm.plot_routing", True), ("someone's script", False)):
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", software)
        Image.new("RGB", (4, 4)).save(run / "routing.png", pnginfo=info)
        assert main([str(run)]) == (0 if replaced else 2)
        with Image.open(run / "routing.png") as image:
            assert image.size != (4, 4) if replaced else image.size == (4, 4)
            assert image.text.get("Software") == ("evals.plot_routing" if replaced else software)
