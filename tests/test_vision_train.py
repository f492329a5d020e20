"""DeepSpeed training of ParameterNet on real images: 2 CPU ranks, loss falls, exact resume after SIGKILL, a stop
signal to one rank checkpoints and exits 0, stage 2."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from runtime.checkpoint import complete_checkpoints
from runtime.schedule import Schedule
from tests.trainer_utils import free_port, track, train_records
from vision.data import (
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    read_idx,
    write_image_folder,
)
from vision.weights import EMA_WEIGHTS, WEIGHTS, load_init_weights, save_weights

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "train_vision.sh"
# Four well-separated Fashion-MNIST classes, 4 epochs of 16 steps: the loss falls clearly (measured: 2 epochs were
# too few - the fall was within the step-to-step noise - and the model was still at chance on the validation set).
EPOCHS = 4
CLASSES = (0, 1, 7, 8)
TRAIN_PER_CLASS, VAL_PER_CLASS = 64, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    env["PYTHONPATH"] = str(REPO)
    return env


def _synthetic_tree(root: Path, classes: int, per_class: dict[str, int]) -> None:
    """Fallback when Debian's Fashion-MNIST is absent: class k = a noisy texture at brightness level k.

    Brightness survives the crops, flips and light RandAugment of the test, so a short run can learn it.
    """
    rng = np.random.default_rng(0)
    levels = np.linspace(40, 215, classes)
    for split, count in per_class.items():
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = np.clip(levels[k] + rng.normal(0, 20, (28, 28)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.png")


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fashion_mnist_tree")
    if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        names = [FASHION_MNIST_CLASSES[c] for c in CLASSES]
        for split, prefix, count in (("train", "train", TRAIN_PER_CLASS), ("validation", "t10k", VAL_PER_CLASS)):
            images = read_idx(DEBIAN_FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz")
            labels = read_idx(DEBIAN_FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")
            keep = np.isin(labels, CLASSES)
            remapped = np.searchsorted(np.array(CLASSES), labels[keep])
            write_image_folder(images[keep], remapped, root / split, names, count)
    else:
        _synthetic_tree(root, len(CLASSES), {"train": TRAIN_PER_CLASS, "validation": VAL_PER_CLASS})
    return root


def _train_args(data_dir: Path, out_dir: Path) -> list[str]:
    # Every random source is on (RandAugment, random erasing, Mixup/CutMix, dropout, drop-path; EMA too), at low
    # strength so that 64 steps still learn: exact resume must hold through every random choice.
    return [
        "--config", "fashion_mnist_tiny", "--dataset", "folder", "--data_dir", str(data_dir),
        "--train_subset", "0", "--micro_batch_size", "8", "--global_batch_size", "16", "--epochs", str(EPOCHS),
        "--lr", "3e-3", "--min_lr", "3e-4", "--warmup_epochs", "0.25", "--auto_augment", "rand-m3-n1-inc1",
        "--re_prob", "0.1",
        "--mixup", "0.1", "--cutmix", "0.1", "--mixup_prob", "0.5", "--drop_path_rate", "0.05", "--ema", "true",
        "--ema_decay", "0.9",
        "--zero_stage", "2", "--ds_config", "zero2", "--num_workers", "0", "--log_interval", "1",
        "--eval_interval_epochs", "1", "--save_interval", "3",
        "--progress_bar", "false", "--tensorboard", "false", "--output_dir", str(out_dir),
    ]  # fmt: skip


class Launch:
    """`NPROC=2 launch/train_vision.sh ...` in its own process group, output to a file (never a full pipe)."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("w") as log:
            self.proc = track(
                subprocess.Popen(
                    ["bash", str(LAUNCH), *args],
                    cwd=REPO,
                    env={**_env(), "NPROC": "2", "MASTER_PORT": str(free_port())},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # SIGKILL to the group reaches the launcher and both ranks
                )
            )

    def wait(self, timeout: float = 600) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        return code, self.log_path.read_text()

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


def _train_losses(out_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in train_records(out_dir)}


def _train_lrs(out_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["lr"] for r in train_records(out_dir)}


def _valid_record(out_dir: Path, iteration: int) -> dict[str, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["kind"] == "valid" and r["iteration"] == iteration]
    return record


def _newest_checkpoint(out_dir: Path) -> int:
    found = complete_checkpoints(out_dir / "checkpoints")
    return found[-1][0] if found else 0


def _resumed_from(log: str) -> int:
    return int(re.search(r"resumed from \S+ \(epoch \d+, iteration (\d+)\)", log).group(1))


@pytest.mark.distributed
def test_two_rank_training_loss_falls_and_resumes_exactly_after_sigkill(image_tree: Path, tmp_path: Path) -> None:
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    # The uninterrupted run and the one to be killed run side by side (their start-ups overlap on 2 cores). The
    # second stops at step 20 (train_iters does not change the schedule, which spans the configured epochs).
    stop = 20
    straight = Launch(_train_args(image_tree, straight_dir), tmp_path / "straight.log")
    killed = Launch([*_train_args(image_tree, killed_dir), "--train_iters", str(stop)], tmp_path / "killed.log")
    # SIGKILL the launcher and both ranks once a mid-run checkpoint is published ...
    deadline = time.time() + 300
    while time.time() < deadline and killed.proc.poll() is None:
        if _newest_checkpoint(killed_dir) >= 6:
            break
        time.sleep(0.05)
    assert killed.proc.poll() is None, "the run finished before it could be killed"
    killed.kill()
    assert max(_train_losses(killed_dir)) < stop
    # ... and run the same command again: it resumes from the last published checkpoint.
    resumed = Launch([*_train_args(image_tree, killed_dir), "--train_iters", str(stop)], tmp_path / "resumed.log")

    code, log = straight.wait()
    assert code == 0, log[-3000:]
    assert "on 2 rank(s)" in log and "ZeRO-2" in log
    losses = _train_losses(straight_dir)
    steps = EPOCHS * (len(CLASSES) * TRAIN_PER_CLASS // 16)
    assert sorted(losses) == list(range(1, steps + 1))
    # The LR each step used is runtime.schedule's: warmup over 0.25 epoch, cosine to min_lr over the epochs.
    schedule = Schedule(lr=3e-3, min_lr=3e-4, warmup_iters=4, decay_iters=steps)
    assert _train_lrs(straight_dir) == {s: schedule.lr_at(s - 1) for s in range(1, steps + 1)}
    first, last = np.mean([losses[s] for s in range(1, 5)]), np.mean([losses[s] for s in range(steps - 7, steps + 1)])
    assert last < first - 0.1, losses
    summary = json.loads((straight_dir / "summary.json").read_text())
    assert summary["task"] == "vision" and summary["world_size"] == 2 and summary["iterations"] == steps
    assert summary["top1"] > 40, summary  # chance is 25% (measured: 72% at the end of this run)
    assert _valid_record(straight_dir, steps)["images"] == 4 * VAL_PER_CLASS
    assert (straight_dir / WEIGHTS).is_file() and (straight_dir / EMA_WEIGHTS).is_file()

    code, log = resumed.wait()
    assert code == 0, log[-3000:]
    assert 6 <= _resumed_from(log) < 16
    # Every step's loss equals the uninterrupted run's, bit for bit, and so does the evaluation at the end of
    # epoch 1 (step 16, after the resume): weights, BatchNorm statistics and EMA all came back exactly.
    assert _train_losses(killed_dir) == {s: losses[s] for s in range(1, stop + 1)}
    assert _train_lrs(killed_dir) == {s: schedule.lr_at(s - 1) for s in range(1, stop + 1)}
    assert _valid_record(killed_dir, 16) == _valid_record(straight_dir, 16)


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state; the name may hold spaces


def _rank_pid(launch_pid: int, rank: int) -> int | None:
    """The pid of the vision.train rank `rank` that `launch/train_vision.sh` (pid `launch_pid`) started, if it runs
    yet. A descendant, not a member of its process group: the launcher runs in a session of its own."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):  # gone meanwhile
            continue
        if not (b"vision.train" in argv and f"RANK={rank}".encode() in environ and b"-m" in argv):
            continue
        pid: int | None = int(entry.name)
        while pid not in (None, 0, 1, launch_pid):
            pid = _parent(pid)
        if pid == launch_pid:
            return int(entry.name)
    return None


@pytest.mark.distributed
def test_a_stop_signal_to_one_rank_checkpoints_exits_0_and_the_run_resumes_from_it(
    image_tree: Path, tmp_path: Path
) -> None:
    """SIGTERM to rank 1 alone (as a scheduler's preemption may reach one process first): its flag travels in the
    step's all-reduce, so both ranks finish the same step, save one checkpoint together and exit 0; the same command
    then continues from that checkpoint to the end."""
    out, iters = tmp_path / "run", 10
    args = [*_train_args(image_tree, out), "--save_interval", "0", "--train_iters", str(iters)]  # no save before
    run = Launch(args, tmp_path / "first.log")
    deadline, signalled = time.time() + 300, False
    while time.time() < deadline and run.proc.poll() is None and not signalled:
        if any(r["iteration"] >= 3 for r in train_records(out)):
            pid = _rank_pid(run.proc.pid, 1)
            assert pid is not None, "rank 1 not found"
            os.kill(pid, signal.SIGTERM)
            signalled = True
        time.sleep(0.05)
    assert signalled, "the run finished (or never logged) before it could be signalled"
    code, log = run.wait()
    assert code == 0, log[-3000:]
    [(stopped_at, _)] = complete_checkpoints(out / "checkpoints")
    assert 3 <= stopped_at < iters and f"checkpoint of iteration {stopped_at} saved" in log
    assert not (out / "summary.json").exists() and not (out / WEIGHTS).exists()  # stopped, not finished
    assert sorted(_train_losses(out)) == list(range(1, stopped_at + 1))

    again = Launch(args, tmp_path / "again.log")
    code, log = again.wait()
    assert code == 0, log[-3000:]
    assert _resumed_from(log) == stopped_at
    assert [r["iteration"] for r in train_records(out)] == list(range(1, iters + 1))  # each step logged once
    assert json.loads((out / "summary.json").read_text())["iterations"] == iters


def test_stage_two_loads_the_backbone_and_reinitialises_the_classifier(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pretrained = timm.create_model("parameternet_tiny", num_classes=4, in_chans=1)
    save_weights(pretrained.state_dict(), tmp_path / WEIGHTS)
    for num_classes in (2, 4):  # a new label set, whether or not it has as many classes
        torch.manual_seed(1)
        finetune = timm.create_model("parameternet_tiny", num_classes=num_classes, in_chans=1)
        fresh_head = finetune.classifier.weight.detach().clone()
        reinit = load_init_weights(finetune, tmp_path / WEIGHTS)
        assert sorted(reinit) == ["classifier.bias", "classifier.weight"]
        assert torch.equal(finetune.conv_stem.cond_conv.weight, pretrained.conv_stem.cond_conv.weight)
        assert torch.equal(finetune.blocks[3][0].ghost1.primary_conv[1].running_mean,
                           pretrained.blocks[3][0].ghost1.primary_conv[1].running_mean)  # fmt: skip
        assert torch.equal(finetune.classifier.weight, fresh_head)
    same_labels = timm.create_model("parameternet_tiny", num_classes=4, in_chans=1)
    assert load_init_weights(same_labels, tmp_path / WEIGHTS, keep_classifier=True) == []
    assert torch.equal(same_labels.classifier.weight, pretrained.classifier.weight)
    with pytest.raises(ValueError, match="keep_classifier needs the same num_classes"):
        load_init_weights(timm.create_model("parameternet_tiny", num_classes=2, in_chans=1), tmp_path / WEIGHTS, True)
    with pytest.raises(ValueError, match="does not fit model"):
        load_init_weights(timm.create_model("parameternet_tiny", num_classes=2, in_chans=3), tmp_path / WEIGHTS)
    with pytest.raises(ValueError, match="does not fit model"):
        load_init_weights(timm.create_model("ghostnet_tiny", num_classes=2, in_chans=1), tmp_path / WEIGHTS)


@pytest.mark.slow
def test_two_stage_pretrain_then_fine_tune_with_layer_decay(image_tree: Path, tmp_path: Path) -> None:
    """Stage 1 on two classes, stage 2 on the other two from its weights (new classifier, layer decay 0.5)."""
    import shutil

    stage1, stage2 = tmp_path / "data1", tmp_path / "data2"
    for split in ("train", "validation"):
        names = sorted(p.name for p in (image_tree / split).iterdir())
        for name in names[:2]:
            shutil.copytree(image_tree / split / name, stage1 / split / name)
        for name in names[2:]:
            shutil.copytree(image_tree / split / name, stage2 / split / name)
    common = ["--config", "fashion_mnist_tiny", "--dataset", "folder", "--train_subset", "0", "--micro_batch_size",
              "8", "--global_batch_size", "8", "--num_workers", "0", "--progress_bar", "false", "--tensorboard",
              "false", "--train_iters", "4"]  # fmt: skip
    run1 = subprocess.run(
        [sys.executable, "-m", "vision.train", *common, "--data_dir", str(stage1), "--output_dir",
         str(tmp_path / "r1")],
        cwd=REPO, env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert run1.returncode == 0, run1.stderr[-3000:]
    run2 = subprocess.run(
        [sys.executable, "-m", "vision.train", *common, "--data_dir", str(stage2), "--output_dir",
         str(tmp_path / "r2"), "--init_from", str(tmp_path / "r1"), "--layer_decay", "0.5", "--re_prob", "0"],
        cwd=REPO, env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert run2.returncode == 0, run2.stderr[-3000:]
    assert "re-initialised classifier.weight, classifier.bias" in run2.stdout
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert summary["num_classes"] == 2 and summary["iterations"] == 4


@pytest.mark.slow
def test_bf16_zero1_trains_a_few_steps(image_tree: Path, tmp_path: Path) -> None:
    """bf16 on the DeepSpeed engine (tiny shapes: bf16 is ~30x slower than fp32 on CPUs without native bf16)."""
    result = subprocess.run(
        [sys.executable, "-m", "vision.train", "--config", "fashion_mnist_tiny", "--dataset", "folder",
         "--data_dir", str(image_tree), "--train_subset", "0", "--micro_batch_size", "4", "--global_batch_size", "4",
         "--precision", "bf16", "--ema", "true", "--train_iters", "2", "--val_subset", "8", "--num_workers", "0",
         "--progress_bar", "false", "--tensorboard", "false", "--output_dir", str(tmp_path / "bf16")],
        cwd=REPO, env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert summary["iterations"] == 2 and np.isfinite(summary["train_loss"]) and np.isfinite(summary["final_val_loss"])


@pytest.mark.slow
def test_launcher_demo_prints_both_accuracies_side_by_side(tmp_path: Path) -> None:
    """`bash launch/train_vision.sh` with no arguments, shortened through DEMO_ARGS (real Fashion-MNIST needed)."""
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (bash scripts/install_system_data.sh)")
    env = dict(
        _env(), DEMO_DIR=str(tmp_path), DEMO_ARGS="--train_subset 640 --val_subset 256 --epochs 1 --progress_bar false"
    )
    result = subprocess.run(["bash", str(LAUNCH)], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    # evals.compare's table, the static twin as the baseline: the delta column is ParameterNet's gain.
    table = result.stdout[result.stdout.index("| Metric | ghostnet_tiny_os4 | parameternet_tiny_os4 |") :]
    assert "Top-1" in table and "Δ parameternet_tiny_os4 − ghostnet_tiny_os4" in table
    report = json.loads((tmp_path / "compare" / "results.json").read_text())
    assert (tmp_path / "compare" / "report.md").is_file() and report["baseline"] == "ghostnet_tiny_os4"
    groups = {group["label"]: group for group in report["groups"]}
    for name in ("parameternet_tiny_os4", "ghostnet_tiny_os4"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["num_classes"] == 10 and _valid_record(tmp_path / name, summary["iterations"])["images"] == 256
        assert groups[name]["accuracy"]["top1"]["mean"] == summary["top1"]
