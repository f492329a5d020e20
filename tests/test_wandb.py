"""Weights & Biases, offline (WANDB_MODE=offline: no server is reached): a run logs the same scalars as metrics.jsonl
and TensorBoard, and its resolved config, into files under <output_dir>/wandb that `wandb sync` uploads later; a
resumed run logs into the same W&B run (its id is kept in the run directory). Read back here from the run's
.wandb files (a LevelDB-style log of W&B's protobuf records)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.trainer_utils import launch, metric_records

pytestmark = pytest.mark.distributed
BLOCK, HEADER = 32768, 7  # the log's block size; each record's header: crc32, length, type (1 full, 2-4 pieces)


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pieces, pos = [], [], HEADER  # the file starts with its own 7-byte header
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if left < HEADER or (kind == 0 and length == 0):  # a block's zero padding
            pos += left
            continue
        pieces.append(data[pos + HEADER : pos + HEADER + length])
        pos += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            records.append(record)
            pieces = []
    return records


def offline_run(path: Path) -> dict:
    """{id, name, project, tags, config, history: {step: {key: value}}} of one offline run directory."""
    [log] = path.glob("run-*.wandb")
    run: dict = {"history": {}, "config": {}}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, name=record.run.display_name, project=record.run.project)
            run["tags"] = list(record.run.tags)
            run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            run["history"].setdefault(int(row["_step"]), {}).update(row)
    return run


def test_offline_wandb_logs_the_metrics_and_config_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    flags = ["--wandb_project", "pn-tests", "--wandb_tags", "tiny", "offline", "--save_interval", "2"]
    result = launch("parameternet", out, *flags, "--train_iters", "4", "--eval_interval", "2", nproc=1)
    assert result.returncode == 0, result.stdout[-4000:]
    result = launch(
        "parameternet", out, *flags, "--train_iters", "6", "--eval_interval", "2", "--resume", "auto", nproc=1
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "resumed from iteration 4" in result.stdout

    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    first, second = (offline_run(path) for path in runs)
    run_id = json.loads((out / "wandb-run.json").read_text())["id"]
    assert first["id"] == second["id"] == run_id  # `wandb sync` puts both into one W&B run
    assert first["project"] == "pn-tests" and first["name"] == "run" and first["tags"] == ["tiny", "offline"]
    assert first["config"]["model"] == "parameternet-llama-tiny" and first["config"]["lr"] > 0
    assert second["config"]["train_iters"] == 6
    assert sorted(first["history"]) == [1, 2, 3, 4] and sorted(second["history"]) == [5, 6]
    logged = {**first["history"], **second["history"]}
    for record in metric_records(out):
        if record["kind"] not in ("train", "valid"):
            continue
        row = logged[record["iteration"]]
        for key in ("lm_loss", "val_loss", "grad_norm", "aux_loss"):
            if record.get(key) is not None:
                assert row[f"{record['kind']}/{key}"] == pytest.approx(record[key], rel=1e-12), (record, key)
    assert "valid/val_loss" in logged[2] and "train/lm_loss" in logged[6]


def test_without_wandb_installed_the_flag_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    from runtime.errors import TrainingError
    from runtime.metrics import WandbRun, WandbSettings

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(TrainingError, match=r"wandb_project='p' needs the wandb package: pip install"):
        WandbRun(tmp_path, WandbSettings("p"), {}, 0)
    assert list(tmp_path.iterdir()) == []
