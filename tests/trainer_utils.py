"""Helpers for the trainer tests: run launch/pretrain_llama.sh (the real deepspeed launcher) on tiny shapes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from runtime.dist import free_port  # also imported from here by the launch tests

REPO = Path(__file__).resolve().parents[1]

# A model small enough that a 2-rank CPU run is dominated by start-up, on the real embedded corpus (vocab 8000).
TINY_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
# The tiny LLM run of the launch tests, as {field: value}; tiny_args(**changes) makes the flags of a variant.
TINY_RUN: dict[str, object] = {
    "seq_len": 32,
    "micro_batch_size": 2,
    "global_batch_size": 8,
    "log_interval": 1,
    "eval_interval": 1000,
    "eval_iters": 1,
    "warmup_iters": 2,
    "progress_bar": False,
    "model_overrides": TINY_MODEL,
}
# The tiny vision run on tiny_image_folder() (its data_dir and output_dir are the test's): tiny_vision_args(...).
TINY_VISION_RUN: dict[str, object] = {
    "config": "fashion_mnist_tiny",
    "dataset": "folder",
    "train_subset": 0,
    "val_subset": 8,
    "micro_batch_size": 4,
    "global_batch_size": 4,
    "train_iters": 2,
    "num_workers": 0,
    "log_interval": 1,
    "progress_bar": False,
    "tensorboard": False,
}


def as_flags(fields: dict[str, object]) -> list[str]:
    """{field: value} -> ["--field", "value", ...]: booleans as true/false, dicts as JSON; None leaves a field out."""

    def text(value: object) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return json.dumps(value) if isinstance(value, dict) else str(value)

    return [item for key, value in fields.items() if value is not None for item in (f"--{key}", text(value))]


def tiny_args(**changes: object) -> list[str]:
    """TINY_RUN's flags with `changes` applied: a new value replaces a field's (in place), None drops it, a field
    TINY_RUN lacks is added after the others."""
    return as_flags({**TINY_RUN, **changes})


def tiny_vision_args(**changes: object) -> list[str]:
    """TINY_VISION_RUN's flags with `changes` applied, as tiny_args does (data_dir=..., output_dir=... among them)."""
    return as_flags({**TINY_VISION_RUN, **changes})


TINY_ARGS = tiny_args()


# Every process group a test started: the conftest kills what is left of them after each test, so a failed test
# never leaves ranks running (holding RAM and CPU) under the tests that follow.
LAUNCHED: list[subprocess.Popen] = []


def track(proc: subprocess.Popen) -> subprocess.Popen:
    LAUNCHED.append(proc)
    return proc


def kill_leftovers() -> None:
    """SIGKILL the process group of every tracked launch that is still running."""
    for proc in LAUNCHED:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    LAUNCHED.clear()


def spawn(cmd: list[str], output_dir: Path, env: dict[str, str], log_name: str | None = None) -> subprocess.Popen:
    """Start `cmd` in the repo, in a process group of its own (tracked), its output appended to the run's log."""
    log = open(output_dir.parent / (log_name or f"{output_dir.name}.log"), "ab")
    return track(
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    )


def launch(
    model: str, output_dir: Path, *extra: str, nproc: int = 2, wait: bool = True, timeout: float = 600
) -> subprocess.Popen | subprocess.CompletedProcess:
    port = free_port()
    cmd = [
        "bash",
        str(REPO / "launch" / "pretrain_llama.sh"),
        model,
        "--output_dir",
        str(output_dir),
        *TINY_ARGS,
        *extra,
    ]
    proc = spawn(cmd, output_dir, {"NPROC": str(nproc), "MASTER_PORT": str(port)})
    proc.master_port = port  # type: ignore[attr-defined]  (names DeepSpeed's shm segments of this run)
    if not wait:
        return proc
    rc = proc.wait(timeout=timeout)
    return subprocess.CompletedProcess(cmd, rc, stdout=read_log(output_dir))


def read_log(output_dir: Path) -> str:
    path = output_dir.parent / f"{output_dir.name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def metric_records(output_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl so far (none before it exists)."""
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by SIGKILL, or being written
            continue
    return records


def train_records(output_dir: Path) -> list[dict]:
    return [r for r in metric_records(output_dir) if r.get("kind") == "train"]


def losses_by_iteration(output_dir: Path) -> dict[int, float]:
    """The last logged loss of every iteration (a resumed run re-logs the iterations after its checkpoint)."""
    return {r["iteration"]: r["lm_loss"] for r in train_records(output_dir)}


def wait_for_iteration(
    proc: subprocess.Popen, output_dir: Path, iteration: int, timeout: float = 600, skip: int = 0
) -> None:
    """Wait until a train record with iteration >= `iteration` appears after the first `skip` records."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["iteration"] >= iteration for r in train_records(output_dir)[skip:]):
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended (rc={proc.returncode}) before iteration {iteration}:\n{read_log(output_dir)[-3000:]}"
            )
        time.sleep(0.2)
    raise AssertionError(f"no iteration {iteration} within {timeout}s")


def shm_segments(port: int) -> tuple[list[str], int]:
    """DeepSpeed shm all-reduce segments of the run on `port`: (names still in /dev/shm, how many unlinked segments
    live processes map)."""
    from runtime.shm import PREFIX, SHM_DIR, mapped_segments

    named = sorted(p.name for p in SHM_DIR.glob(f"{PREFIX}{os.getuid()}_*_{port}_*"))
    unlinked = [name for name, deleted in mapped_segments().items() if deleted and f"_{port}_" in name]
    return named, len(unlinked)


def tiny_image_folder(root: Path, splits: tuple[str, ...] = ("train", "validation"), per_class: int = 4) -> Path:
    """An ImageFolder tree of two solid-colour classes (32x32 PNGs): data for launch tests of the vision trainer."""
    from PIL import Image

    for split in splits:
        for label, colour in (("a", (220, 20, 20)), ("b", (20, 20, 220))):
            (root / split / label).mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (32, 32), colour).save(root / split / label / f"{k}.png")
    return root


# The start of a `python -c` script that builds a DeepSpeed engine on one CPU rank (gloo, a free port, one thread).
ONE_RANK_ENGINE_PREAMBLE = r"""
import json, os, socket, sys
import torch
torch.set_num_threads(1)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
"""
