"""Resume safety on one CPU rank through the real entry point (python -m llm.pretrain): checkpoints verified by
content, settings compared with the checkpoint's, replayed metrics not duplicated, nothing written before a refusal,
no run without validation unless asked, and non-finite weights never published."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from llm.train.config import RESUME_POLICY
from runtime.checkpoint import CHECKSUM, MANIFEST, complete_checkpoints, read_manifest, tag_for, verify_files
from runtime.resume import resume_differences
from tests.trainer_utils import REPO, TINY_MODEL, tiny_args, train_records

ITERS, SAVE = 6, 4
# One rank, two micro-batches of 2 per step: start-up dominates.
ARGS = ["--config", "tiny", "--model", "llama-tiny", *tiny_args(global_batch_size=4, export=False, save_interval=SAVE)]


def pretrain(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    return subprocess.run(
        [sys.executable, "-m", "llm.pretrain", *ARGS, "--output_dir", str(out), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(directory.rglob("*"))
    }


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """Vanilla tiny model, 6 iterations, checkpoints at 4 and 6."""
    out = tmp_path_factory.mktemp("base") / "run"
    proc = pretrain(out, "--train_iters", str(ITERS))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


# ------------------------------------------------------------------------------------------------ checksums
def test_manifest_holds_a_checksum_of_every_file(base_run):
    ckpt = base_run / "checkpoints" / tag_for(ITERS)
    manifest = read_manifest(ckpt)
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(manifest["files"]) == on_disk and manifest["checksum"] == CHECKSUM
    assert all(len(entry[CHECKSUM]) == 32 for entry in manifest["files"].values())
    assert manifest["world_size"] == 1
    verify_files(ckpt, manifest)


def _overwrite_keeping_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 9, len(data), len(data) // 9)[:8]:
        data[offset : offset + 4096] = b"\xff" * len(data[offset : offset + 4096])
    path.write_bytes(bytes(data))


def test_corruption_that_keeps_the_size_is_caught(base_run, tmp_path):
    ckpt = tmp_path / tag_for(ITERS)
    shutil.copytree(base_run / "checkpoints" / tag_for(ITERS), ckpt)
    manifest = read_manifest(ckpt)
    target = ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = target.stat().st_size
    _overwrite_keeping_size(target)
    assert target.stat().st_size == size
    with pytest.raises(ValueError, match="does not match its xxh3_128 checksum"):
        verify_files(ckpt, manifest)


def test_old_manifest_without_checksums_still_loads_with_a_warning(base_run, tmp_path):
    ckpt = tmp_path / tag_for(ITERS)
    shutil.copytree(base_run / "checkpoints" / tag_for(ITERS), ckpt)
    manifest = read_manifest(ckpt)
    manifest["files"] = {rel: entry["bytes"] for rel, entry in manifest["files"].items()}  # the old format
    del manifest["checksum"], manifest["world_size"]
    with pytest.warns(UserWarning, match="written before checksums were recorded; only the sizes"):
        verify_files(ckpt, manifest)
    (ckpt / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="model.safetensors has 1 bytes"):
        verify_files(ckpt, manifest)


@pytest.fixture(scope="module")
def fallback_run(base_run, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The base run with its newest checkpoint corrupted in place (sizes kept), resumed with a longer budget and
    another log interval: falls back to iteration 4 and replays 5 and 6."""
    out = tmp_path_factory.mktemp("fallback") / "run"
    shutil.copytree(base_run, out)
    _overwrite_keeping_size(out / "checkpoints" / tag_for(ITERS) / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    proc = pretrain(out, "--train_iters", str(ITERS + 2), "--log_interval", "2", "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_corrupt_checkpoint_falls_back_to_the_previous_one(fallback_run):
    out, proc = fallback_run
    log = proc.stdout + proc.stderr
    assert "does not match its xxh3_128 checksum" in log and "falling back to the previous one" in log
    assert f"resumed from iteration {SAVE}" in log


def test_allowed_changes_are_logged(fallback_run):
    out, proc = fallback_run
    assert f"resume: train_iters {ITERS} -> {ITERS + 2}" in proc.stdout
    assert "resume: log_interval 1 -> 2" in proc.stdout


def test_replayed_iterations_are_logged_once(fallback_run):
    out, _ = fallback_run
    iterations = [r["iteration"] for r in train_records(out)]
    # 1..4 from the first run (log_interval 1), then every 2nd from the resumed one; 5 and 6 of the dead run gone.
    assert iterations == [1, 2, 3, 4, 6, 8]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/lm_loss")]
    assert steps == [1, 2, 3, 4, 6, 8]


# ------------------------------------------------------------------------------------------- settings check
def test_every_config_field_has_a_resume_policy():
    from llm.train.config import FIELDS

    assert set(RESUME_POLICY) == set(FIELDS)


def test_changed_settings_and_model_are_refused_before_anything_is_written(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    before = snapshot(out)
    other_model = json.dumps({**TINY_MODEL, "hidden_size": 32})
    proc = pretrain(
        out,
        "--train_iters",
        str(ITERS + 2),
        "--resume",
        "auto",
        "--seq_len",
        "64",
        "--global_batch_size",
        "8",
        "--lr",
        "0.1",
        "--model_overrides",
        other_model,
    )
    assert proc.returncode == 2, proc.stderr[-4000:]
    [line] = error_lines(proc)
    assert "Traceback" not in proc.stderr
    for field in (
        "seq_len=32",
        "global_batch_size=4",
        "lr=0.002",
        "seq_len=64",
        "global_batch_size=8",
        "lr=0.1",
        "model_overrides=",
    ):
        assert field in line, field
    assert "--model_overrides '{" in line and "--seq_len 32 --global_batch_size 4 --lr 0.002" in line
    assert "start a new --output_dir" in line
    assert "corrupt" not in proc.stderr and "falling back" not in proc.stderr
    assert snapshot(out) == before  # no metrics line, no TensorBoard events file, no config.yaml rewrite


def _manifest(world_size: int | None, **config) -> dict:
    from llm.train.config import TrainConfig

    files = {f"rng_rank{r}.pt": {"bytes": 1, CHECKSUM: "0"} for r in range(world_size or 2)}
    manifest = {"iteration": 8, "files": files, "config": {**TrainConfig().to_dict(), **config}}
    if world_size is not None:
        manifest["world_size"] = world_size
    return manifest


def test_another_world_size_is_a_mismatch_where_the_optimizer_state_is_sharded():
    from llm.train.config import TrainConfig

    config = TrainConfig().to_dict()
    # World size read from the manifest, or (older manifests) counted from the per-rank RNG files.
    for manifest in (_manifest(2, zero_stage=2), _manifest(None, zero_stage=2)):
        refusal, _ = resume_differences(Path("ck"), manifest, {**config, "zero_stage": 2}, 1, RESUME_POLICY)
        assert refusal is not None and "world_size=2" in refusal and "world_size=1" in refusal
        assert "NPROC=2" in refusal
    # ZeRO-0 keeps the whole optimizer state on every rank: another world size is allowed, and logged.
    refusal, changes = resume_differences(
        Path("ck"), _manifest(2, zero_stage=0), {**config, "zero_stage": 0}, 1, RESUME_POLICY
    )
    assert refusal is None and changes == ["resume: world_size 2 -> 1"]


def test_a_trainer_that_reshards_allows_another_topology_between_zero1_and_zero2():
    from llm.train.config import TrainConfig

    config = TrainConfig().to_dict()
    saved = _manifest(2, zero_stage=2, expert_parallel_size=2)
    now = {**config, "zero_stage": 1, "expert_parallel_size": 1}
    refusal, changes = resume_differences(Path("ck"), saved, now, 1, RESUME_POLICY, reshards=True)
    assert refusal is None
    assert changes == ["resume: resharded from 2 ranks (EP 2, ZeRO-2) to 1 rank (EP 1, ZeRO-1)"]
    # Without resharding (vision's trainer), the same change is refused, as before.
    refusal, _ = resume_differences(Path("ck"), saved, now, 1, RESUME_POLICY)
    assert refusal is not None and "zero_stage=2, expert_parallel_size=2, world_size=2" in refusal
    # The same topology needs nothing; ZeRO-3 on either side is refused with what resharding covers, and the fix.
    same = {**config, "zero_stage": 2, "expert_parallel_size": 2}
    assert resume_differences(Path("ck"), saved, same, 2, RESUME_POLICY, reshards=True) == (None, [])
    for old, new in ((3, 2), (2, 3)):
        refusal, _ = resume_differences(
            Path("ck"), _manifest(2, zero_stage=old), {**config, "zero_stage": new}, 1, RESUME_POLICY, reshards=True
        )
        assert refusal is not None and "resharding reads and writes ZeRO-1/2 optimizer shards" in refusal
        assert "ZeRO-3" in refusal and f"--zero_stage {old}" in refusal and "NPROC=2" in refusal
    # Another refused field is still refused next to a reshard, which the refusal then does not mention.
    refusal, _ = resume_differences(Path("ck"), saved, {**now, "seq_len": 64}, 1, RESUME_POLICY, reshards=True)
    assert refusal is not None and "seq_len" in refusal and "zero_stage" not in refusal


# ---------------------------------------------------------------------------------------- empty validation
@pytest.fixture(scope="module")
def ten_documents(tmp_path_factory) -> tuple[str, str]:
    import numpy as np

    from llm.data import ensure_default_corpus
    from llm.data.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path_factory.mktemp("corpus") / "ten")
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix) as builder:
        for _ in range(10):
            builder.add_document(rng.integers(3, 8000, 300).astype(np.uint16))
    return prefix, str(ensure_default_corpus().tokenizer_dir)


def test_an_empty_validation_split_is_refused(ten_documents, tmp_path):
    prefix, tokenizer = ten_documents
    out = tmp_path / "run"
    proc = pretrain(out, "--train_iters", "2", "--data_path", prefix, "--tokenizer", tokenizer)
    assert proc.returncode == 2, proc.stderr[-4000:]
    [line] = error_lines(proc)
    assert "split='969,30,1'" in line and "10 documents" in line and "--split 80,20,0" in line
    assert "--eval_iters 0" in line and "at least 17 documents" in line
    assert not out.exists()


def test_an_empty_validation_split_with_evaluation_off_warns_once(ten_documents, tmp_path):
    prefix, tokenizer = ten_documents
    out = tmp_path / "run"
    proc = pretrain(out, "--train_iters", "1", "--data_path", prefix, "--tokenizer", tokenizer, "--eval_iters", "0")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("gives the validation split none of the 10 documents") == 1
    assert "evaluation is off (eval_iters=0)" in proc.stderr


# -------------------------------------------------------------------------------------------- non-finite
NONFINITE = r"""
import json, sys, torch
from llm.train.config import load_config
from llm.train.trainer import Trainer, TrainingError

class Diverging(Trainer):
    # The real loop; iteration 2's loss is made non-finite (a skipped step), and after iteration 3 the weights turn
    # NaN, as a corrupted optimizer state makes them (ZeRO-0: no master copy restores them at the next step).
    def _forward(self, batch):
        total, lm_loss, out = super()._forward(batch)
        if self.iteration + 1 == 2:
            total, lm_loss = total * float("nan"), lm_loss * float("nan")
        return total, lm_loss, out
    def train_step(self, batches):
        stats = super().train_step(batches)
        if self.iteration + 1 == 3:
            with torch.no_grad():
                next(self.engine.module.parameters()).fill_(float("nan"))
        return stats

errors = {}
# a: the NaN weights reach the end (the final validation loss is NaN); b: they reach a periodic save (iteration 4).
for name, iters in (("a", "4"), ("b", "5")):
    args = sys.argv[2:] + ["--train_iters", iters, "--save_interval", "2", "--output_dir", f"{sys.argv[1]}/{name}"]
    try:
        Diverging(load_config("tiny", cli_overrides=args)).train()
        errors[name] = None
    except TrainingError as err:
        errors[name] = str(err)
print(json.dumps(errors))
"""


def test_nonfinite_weights_are_never_published(tmp_path):
    args = ARGS[2:] + ["--export", "true", "--zero_stage", "0"]
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions")),
    }
    proc = subprocess.run(
        [sys.executable, "-c", NONFINITE, str(tmp_path), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert errors["a"] is not None and "iteration 4: the final validation loss is not finite (nan)" in errors["a"]
    assert errors["b"] is not None and "iteration 4: the weights are not finite" in errors["b"]
    for name in ("a", "b"):
        out = tmp_path / name
        assert f"{tag_for(2)}, is from before" in errors[name]
        assert [it for it, _ in complete_checkpoints(out / "checkpoints")] == [2]  # iteration 4's weights: not saved
        assert not (out / "hf").exists() and not (out / "summary.json").exists()
    out = tmp_path / "a"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r["kind"] == "train" and r["iteration"] == 2]
    assert skipped and skipped[0]["skipped"] is True and skipped[0]["lm_loss"] is None
    valid = [r for r in records if r["kind"] == "valid"]
    assert valid and valid[-1]["val_loss"] is None  # NaN is logged as null, never as a number


def test_new_manifests_verify_without_warnings(base_run):
    ckpt = base_run / "checkpoints" / tag_for(ITERS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verify_files(ckpt, read_manifest(ckpt))


# ------------------------------------------------------------------------------- one run per directory (issue 25)
def test_a_second_training_into_a_running_output_dir_is_refused_and_the_first_is_untouched(tmp_path):
    """Two trainings into one --output_dir: the first holds RUN/.run.lock (an flock) for the whole run, the second is
    refused at start with one line naming the holder. A temporary checkpoint directory of another run token was left by
    a run that no longer holds the lock (only the lock holder saves), so the first run removes it and says so (issue
    33); the refused second run removes nothing."""
    out = tmp_path / "run"
    foreign = out / "checkpoints" / ".tmp-iter_0000004-0123456789ab"
    foreign.mkdir(parents=True)
    (foreign / "mp_rank_00_model_states.pt").write_bytes(b"another run's save in progress")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    command = [sys.executable, "-m", "llm.pretrain", *ARGS, "--output_dir", str(out), "--train_iters", str(ITERS)]
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = out / ".run.lock"
        deadline = time.monotonic() + 300
        while not (lock.is_file() and f'"pid": {first.pid}' in lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # it holds the lock: the second one starts while it is mid-run
        try:
            second = pretrain(out, "--train_iters", str(ITERS))
        finally:
            first.send_signal(signal.SIGCONT)
        first_out, first_err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-4000:]
    [line] = error_lines(second)
    assert f"output_dir='{out}' is in use by host {socket.gethostname()}, PID {first.pid}, started " in line
    assert "or choose another --output_dir" in line
    assert first.returncode == 0, first_err[-4000:]
    assert [r["iteration"] for r in train_records(out)] == list(range(1, ITERS + 1))  # once each
    assert not foreign.exists() and f"checkpoints: removed {foreign} (30 bytes)" in first_out  # a dead run's, said
    assert not list((out / "checkpoints").glob(".tmp-*"))  # ours were published
    assert [it for it, _ in complete_checkpoints(out / "checkpoints")] == [SAVE, ITERS]
    newest = out / "checkpoints" / tag_for(ITERS)
    verify_files(newest, read_manifest(newest))  # every listed file exists, with its checksum
    assert not lock.exists() and (out / "summary.json").is_file()


DISK_FULL = r"""
import json, os, shutil, subprocess, sys
from pathlib import Path

disk, args = Path(sys.argv[1]), sys.argv[2:]
run, filler = disk / "run", disk / "filler"
env = {**os.environ, "PYTHONUNBUFFERED": "1"}


def pretrain(*extra):
    proc = subprocess.run([sys.executable, "-m", "llm.pretrain", *args, "--output_dir", str(run), *extra],
                          capture_output=True, text=True, env=env, timeout=1200)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return {"rc": proc.returncode, "errors": errors, "traceback": "Traceback" in proc.stderr,
            "tail": proc.stderr[-3000:]}


def size(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def leave_free(nbytes):
    filler.unlink(missing_ok=True)
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(free - nbytes, 1))


def state():
    checkpoints = run / "checkpoints"
    return {"latest": (checkpoints / "latest").read_text(), "tmp": sorted(p.name for p in checkpoints.glob(".tmp-*")),
            "summary": (run / "summary.json").is_file()}


out = {}
out["first"] = pretrain("--train_iters", "2")  # a finished run: one checkpoint and hf/, to measure them
ckpt, hf = size(run / "checkpoints" / "iter_0000002"), size(run / "hf")
leave_free(ckpt // 2)  # iteration 4's checkpoint cannot be written
out["save"] = {**pretrain("--train_iters", "4", "--resume", "auto"), **state()}
leave_free(ckpt + hf // 2)  # the checkpoint fits, the export does not
out["export"] = {**pretrain("--train_iters", "4", "--resume", "auto"), **state()}
filler.unlink()
out["resumed"] = {**pretrain("--train_iters", "4", "--resume", "auto"), **state()}
out["records"] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
out["run"] = str(run)
print(json.dumps(out))
"""


def test_disk_full_is_one_line_keeps_the_last_checkpoint_and_the_resumed_run_logs_each_record_once(tmp_path):
    """A full disk (a 160 MiB tmpfs in a mount namespace of the test's own) while saving a checkpoint and while
    exporting: one line naming the cause, the directory and what is kept; `latest` never moves to a partial
    checkpoint; after space is freed, --resume auto finishes the run and every record is in metrics.jsonl once (the
    validation record of the iteration it resumed at included)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL)
    args = [*ARGS[: ARGS.index("--export")], *ARGS[ARGS.index("--export") + 2 :], "--export", "true"]
    args += ["--save_interval", "100", "--eval_iters", "1"]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(REPO / ".venv" / "torch_extensions")}
    mount = f'mount -t tmpfs -o size=160m tmpfs {disk} && exec {sys.executable} {script} {disk} "$@"'
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, "sh", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0 and "mount" in proc.stderr and "Traceback" not in proc.stderr:
        pytest.skip(f"no tmpfs in a user namespace here: {proc.stderr.strip()[:300]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    run = out["run"]
    assert out["first"]["rc"] == 0, out["first"]["tail"]
    save = out["save"]
    assert save["rc"] == 2 and not save["traceback"] and len(save["errors"]) == 1, save["tail"]
    assert (
        f"error: No space left on device under {run}/checkpoints while saving checkpoint iter_0000004"
        in (save["errors"][0])
    )
    assert f"the newest complete checkpoint, {run}/checkpoints/iter_0000002, is kept" in save["errors"][0]
    assert "--resume auto" in save["errors"][0]
    assert save["latest"] == "iter_0000002" and save["tmp"] == [] and save["summary"] is False
    export = out["export"]
    assert export["rc"] == 2 and not export["traceback"] and len(export["errors"]) == 1, export["tail"]
    assert f"error: No space left on device under {run}/hf while exporting the final weights" in export["errors"][0]
    assert export["latest"] == "iter_0000004" and export["tmp"] == [] and export["summary"] is False
    resumed = out["resumed"]
    assert resumed["rc"] == 0 and resumed["summary"] is True, resumed["tail"]
    keys = [(r["kind"], r["iteration"]) for r in out["records"]]
    assert sorted(set(keys)) == sorted(keys), keys  # no record twice
    assert [i for kind, i in keys if kind == "train"] == [1, 2, 3, 4] and ("valid", 4) in keys


# ------------------------------------------------------------------------- issue 33: nothing lost around new features
# lm-eval made to fail at every evaluation, without touching a file of the project: a sitecustomize on PYTHONPATH.
FAILING_LM_EVAL = """
import lm_eval.evaluator


def evaluate(*args, **kwargs):
    raise RuntimeError("injected lm-eval failure")


lm_eval.evaluator.evaluate = evaluate
"""
DEAD_TOKEN = "0123456789ab"  # the run token of a run killed while saving (a live run's is random)


@pytest.fixture(scope="module")
def failing_eval_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """4 iterations, a checkpoint and a validation with --eval_tasks at 2 and 4, export on, lm-eval raising at every
    evaluation; the output directory holds the temporary checkpoint of a run killed mid-save (another token)."""
    root = tmp_path_factory.mktemp("failing_eval")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(FAILING_LM_EVAL)
    out = root / "run"
    dead = out / "checkpoints" / f".tmp-iter_0000004-{DEAD_TOKEN}"
    dead.mkdir(parents=True)
    (dead / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 123_456)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "site"), str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    flags = ["--train_iters", "4", "--save_interval", "2", "--eval_interval", "2", "--eval_tasks", "arc_easy"]
    proc = subprocess.run(
        [sys.executable, "-m", "llm.pretrain", *ARGS, "--output_dir", str(out), *flags, "--eval_limit", "2"]
        + ["--export", "true"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return out, proc


def test_a_failing_zero_shot_evaluation_never_costs_the_training(failing_eval_run):
    """Issue 33, item 1: lm-eval raising at iteration 2 and at the end used to end the run (traceback, exit 1): no
    checkpoint at 2, no final checkpoint, summary.json or export. Now one warning line per evaluation naming the task
    and the cause, a zero_shot_failed record, and the run finishes with every save."""
    out, proc = failing_eval_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    warnings_ = [line for line in proc.stderr.splitlines() if line.startswith("warning: zero-shot evaluation")]
    assert warnings_ == [
        f"warning: zero-shot evaluation of arc_easy at iteration {i} failed (RuntimeError: injected lm-eval failure); "
        f"recorded in metrics.jsonl as zero_shot_failed, training goes on"
        for i in (2, 4)
    ]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    failed = [r for r in records if r["kind"] == "zero_shot_failed"]
    assert [(r["iteration"], r["tasks"], r["error"]) for r in failed] == [
        (i, ["arc_easy"], "RuntimeError: injected lm-eval failure") for i in (2, 4)
    ]
    assert [i for i, _ in complete_checkpoints(out / "checkpoints")] == [2, 4]
    assert json.loads((out / "summary.json").read_text())["iterations"] == 4
    assert (out / "hf" / "model.safetensors").is_file()


def test_the_lock_holder_removes_a_dead_runs_temporary_checkpoint(failing_eval_run):
    """Issue 33, item 4: a save killed mid-way (SIGKILL) left checkpoints/.tmp-iter_N-<token>/ that no later run
    removed. The run holding the run directory's lock removes another token's temporaries, saying what and how many
    bytes; its own are kept (unit check below)."""
    out, proc = failing_eval_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    dead = out / "checkpoints" / f".tmp-iter_0000004-{DEAD_TOKEN}"
    assert not dead.exists()
    assert (
        f"checkpoints: removed {dead} (123.5 kB), the unfinished save of a run that is no longer alive "
        f"(it does not hold the run's lock)" in proc.stdout
    )


def test_dead_saves_are_told_from_the_live_runs_own(tmp_path):
    from runtime.checkpoint import remove_dead_saves

    root = tmp_path / "checkpoints"
    names = [f".tmp-iter_0000002-{DEAD_TOKEN}", ".tmp-iter_0000004-aaaaaaaaaaaa", ".tmp-iter_0000006-ffffffffffff"]
    names += [".tmp-notes", "iter_0000002", ".tmp-iter_0000008-xyz"]  # not a save's temporary: never touched
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "f").write_bytes(b"x" * 10)
    lines = remove_dead_saves(root, "ffffffffffff")  # this run's token: its own temporary is a save in progress
    assert sorted(p.name for p in root.iterdir()) == sorted(names[2:])
    assert lines == [f"removed {root / n} (10 bytes), {lines[0].split(', ', 1)[1]}" for n in sorted(names[:2])]


def test_reshard_refuses_an_out_inside_a_checkpoint_and_names_out_when_it_cannot_write(
    base_run, tmp_path, monkeypatch, capsys
):
    """Issue 33, item 5: `llm.reshard CKPT CKPT/x.safetensors` wrote 48 MB into the checkpoint; a read-only OUT gave
    the errno of the temporary file beside it."""
    from llm import reshard

    ckpt = base_run / "checkpoints" / tag_for(ITERS)
    before = snapshot(base_run)
    for out in (ckpt / "x.safetensors", base_run / "checkpoints" / "x.safetensors"):
        assert reshard.main([str(ckpt), str(out)]) == 1
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"llm.reshard: error: OUT {out}: ") and "belongs to a training run" in line, line
        assert "outside the run" in line
    assert snapshot(base_run) == before

    def read_only(*args, **kwargs):  # what mkstemp raises in a directory the user cannot write
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / ".x.safetensors.abc123.tmp"))

    monkeypatch.setattr("runtime.fsutil.temp_path_for", read_only)
    out = tmp_path / "ro" / "x.safetensors"
    assert reshard.main([str(ckpt), str(out)]) == 1
    line = capsys.readouterr().err.strip()
    assert line == (
        f"llm.reshard: error: OUT={out}: cannot be written (Permission denied); choose a writable directory with "
        f"room for it"
    )


def test_wait_for_file_waits_for_a_late_file_and_names_one_that_never_comes(tmp_path, monkeypatch):
    """Issue 33, item 6: a file another node wrote appears late on a shared file system: waited for, bounded."""
    import threading

    from runtime.sharedfs import WAIT_ENV, FileWaitTimeout, wait_for_file

    late = tmp_path / "late.json"
    threading.Timer(0.4, late.write_text, args=("{}",)).start()
    started = time.monotonic()
    assert wait_for_file(late, timeout=30) == late and time.monotonic() - started >= 0.3
    monkeypatch.setenv(WAIT_ENV, "0.2")
    with pytest.raises(FileWaitTimeout) as err:
        wait_for_file(tmp_path / "never.json")
    assert str(err.value).startswith(f"{tmp_path / 'never.json'} did not appear within 0.2 s, although another rank")
    assert f"{WAIT_ENV}=SECONDS" in str(err.value)
    monkeypatch.setenv(WAIT_ENV, "soon")
    with pytest.raises(ValueError, match=f"{WAIT_ENV}='soon'"):
        wait_for_file(tmp_path / "never.json")


def test_resume_waits_for_checkpoint_files_another_rank_sees(base_run, tmp_path, monkeypatch):
    """Issue 33, item 6: at resume a rank whose node does not see a checkpoint file yet, that another rank sees, waits
    for it rather than calling the checkpoint corrupt and falling back (simulated: `any_rank` says another rank sees
    everything; the file comes back 0.5 s later). One that never comes is named by the fallback's warning."""
    import threading

    import runtime.checkpoint as checkpoint
    from runtime.sharedfs import WAIT_ENV

    root = tmp_path / "checkpoints"
    shutil.copytree(base_run / "checkpoints", root)
    monkeypatch.setattr(checkpoint, "any_rank", lambda flag, group=None: True)
    weights, hidden = root / tag_for(ITERS) / "model.safetensors", tmp_path / "model.safetensors"
    weights.rename(hidden)
    threading.Timer(0.5, hidden.rename, args=(weights,)).start()

    def loaded():
        return checkpoint.load_latest(None, root, lambda d, m: (None, []), load_state=lambda *a: {"state": 1})

    assert loaded() == (ITERS, {"state": 1}, [])
    weights.rename(hidden)
    monkeypatch.setenv(WAIT_ENV, "0.2")
    with pytest.warns(UserWarning, match=f"{weights} did not appear within 0.2 s"):
        assert loaded()[0] == SAVE
