"""Metrics of a run: metrics.jsonl (+ TensorBoard, + Weights & Biases) on rank 0, trimmed when a run resumes; peak
FLOP/s and memory."""

from __future__ import annotations

import json
import math
import re
import resource
import secrets
import string
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runtime.errors import TrainingError
from runtime.fsutil import write_text_atomic
from runtime.rundir import METRICS, TENSORBOARD

# Dense bf16 peak FLOP/s (no sparsity) of known accelerators, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "V100": 125e12,  # fp16 tensor cores
    "MI300X": 1307e12,
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s per device for MFU, or None where it is not meaningful (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            # fp32 matmuls run on TF32 tensor cores at half the bf16 rate on Ampere/Hopper.
            return value if precision in ("bf16", "fp16") else value / 2
    return None


def memory_gib(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "mem_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    return {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _json_safe(value: Any) -> Any:
    # json.dumps writes NaN/Infinity, which strict JSON readers refuse; a non-finite number is logged as null.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def trim_jsonl(path: Path, last_iteration: int, redone: tuple[str, ...] = ()) -> int:
    """Keep the records of iterations <= `last_iteration` (a resumed run replays the ones after its checkpoint;
    lines cut by a crash go too), less those of a kind in `redone` at `last_iteration` itself (a run resumed at its
    end evaluates again). Rewritten atomically; returns how many lines were dropped."""
    if not path.is_file():
        return 0
    kept: list[str] = []
    lines = path.read_text().splitlines()
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        iteration = record.get("iteration", 0)
        if iteration < last_iteration or (iteration == last_iteration and record.get("kind") not in redone):
            kept.append(line)
    if len(kept) < len(lines):
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)


WANDB_ID = "wandb-run.json"  # in output_dir: the W&B run id, so that every resume logs into the same run
WANDB_ID_RE = re.compile(r"[^/\\#?%:\s]{1,128}")  # characters W&B accepts in a run id
JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


def _wandb_id_problem(id_file: Path) -> tuple[str | None, str | None]:
    """(the run id in `id_file`, None) or (None, what is wrong with the file)."""
    try:
        data = json.loads(id_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"is not valid JSON ({err})"
    if not isinstance(data, dict):
        return None, f"holds {JSON_TYPES.get(type(data), 'null')}, not an object with the run id"
    run_id = data.get("id")
    if not isinstance(run_id, str):
        return None, 'has no run id ("id" is missing or not a string)'
    if not WANDB_ID_RE.fullmatch(run_id):
        return None, f"holds the run id {run_id!r}, which W&B does not accept"
    return run_id, None


def read_wandb_id(output_dir: Path) -> str | None:
    """The W&B run id kept in output_dir/wandb-run.json (None: no such file yet). A file that does not hold one is
    refused with one line naming it, what is wrong and the fix, before the run writes anything: a new id would
    split the run's curves over two W&B runs without a word."""
    id_file = output_dir / WANDB_ID
    if not id_file.is_file():
        return None
    run_id, problem = _wandb_id_problem(id_file)
    if problem is None:
        return run_id
    raise TrainingError(
        f"{id_file} {problem}; it keeps the W&B run id that every resume of this run logs into. Write it back as "
        f'{{"id": "RUN_ID"}} (RUN_ID ends the names of {output_dir / "wandb"}/run-*-RUN_ID), or move the file away '
        f"to log into a new W&B run"
    )


def scalar_tag(record: dict[str, Any], key: str) -> str:
    """TensorBoard's and W&B's name of a record's scalar: kind/key (moe/... as it is)."""
    return key if key.startswith("moe/") else f"{record.get('kind', 'train')}/{key}"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    return {
        scalar_tag(record, key): value
        for key, value in record.items()
        if key not in ("kind", "iteration") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


@dataclass(frozen=True)
class WandbSettings:
    """--wandb_project and friends (both trainers' fields)."""

    project: str
    entity: str | None = None
    run_name: str | None = None
    tags: tuple[str, ...] = ()


def wandb_settings(cfg: Any) -> WandbSettings | None:
    """A trainer config's wandb_* fields (None: W&B is off)."""
    if not cfg.wandb_project:
        return None
    return WandbSettings(cfg.wandb_project, cfg.wandb_entity, cfg.wandb_run_name, tuple(cfg.wandb_tags))


class WandbRun:
    """Weights & Biases beside metrics.jsonl: the same scalars as TensorBoard at step = iteration, the resolved config,
    one W&B run per output_dir (its id kept in output_dir/wandb-run.json, so a resumed run logs into it again).
    Offline (WANDB_MODE=offline, or when the server cannot be reached at start) the run's files stay in
    output_dir/wandb/ for `wandb sync` to upload later."""

    def __init__(self, output_dir: Path, settings: WandbSettings, config: dict[str, Any], start_iteration: int) -> None:
        try:
            import wandb
        except ImportError as err:
            raise TrainingError(
                f"wandb_project={settings.project!r} needs the wandb package: pip install 'parameternet[wandb]' (or "
                f"pip install wandb), or drop --wandb_project"
            ) from err
        id_file = output_dir / WANDB_ID
        # W&B's own form of a run id: 8 characters of [a-z0-9].
        alphabet = string.ascii_lowercase + string.digits
        new_id = "".join(secrets.choice(alphabet) for _ in range(8))
        run_id = read_wandb_id(output_dir) or new_id
        init = {
            "project": settings.project,
            "entity": settings.entity,
            "name": settings.run_name or output_dir.name,
            "tags": list(settings.tags) or None,
            "config": config,
            "dir": str(output_dir),
            "id": run_id,
            "resume": "allow",
        }
        try:
            self.run = wandb.init(**init)
        except Exception as err:  # no network, no login: keep the metrics, upload them later
            warnings.warn(
                f"wandb: could not start an online run ({type(err).__name__}: {err}); logging offline to "
                f"{output_dir / 'wandb'} (upload later with `wandb sync`)",
                stacklevel=2,
            )
            self.run = wandb.init(**init, mode="offline")
        if not id_file.is_file():
            write_text_atomic(id_file, json.dumps({"id": run_id, "project": settings.project}))
        # A resumed run replays the iterations after its checkpoint; W&B keeps what was logged at a step already
        # (the same values: resume is exact) and refuses steps below its last, so those are not sent again.
        self.first_new_step = max(start_iteration, int(self.run.step or 0))

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("iteration", 0))
        values = scalars(record)
        if values and step >= self.first_new_step:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Writes only on rank 0; other ranks get a logger that does nothing.

    `start_iteration` is where this run starts (a resumed checkpoint's iteration, else 0): what a dead run logged
    after it is removed from metrics.jsonl and hidden from TensorBoard (`purge_step`), so every iteration appears
    once. `reevaluated`: the run starts at its last iteration (a finished run resumed, e.g. after its export
    failed), whose final evaluation it repeats: the validation record of that iteration goes too. Records are keyed by
    "iteration" (runtime.rundir)."""

    def __init__(
        self,
        output_dir: Path,
        enabled: bool,
        start_iteration: int = 0,
        tensorboard: bool = True,
        reevaluated: bool = False,
        wandb: WandbSettings | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.wandb: WandbRun | None = None
        if wandb is not None:  # every rank: a bad wandb-run.json is refused alike everywhere, before any write
            read_wandb_id(output_dir)
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            dropped = trim_jsonl(
                output_dir / METRICS, start_iteration, ("valid", "zero_shot", "zero_shot_failed") if reevaluated else ()
            )
            if dropped:
                print(
                    f"metrics.jsonl: dropped {dropped} records past iteration {start_iteration} (the steps this "
                    f"run replays)"
                )
            self.jsonl = open(output_dir / METRICS, "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / TENSORBOARD), purge_step=start_iteration + 1)
            if wandb is not None:
                self.wandb = WandbRun(output_dir, wandb, config or {}, start_iteration)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
        if self.tb is not None:
            step = record.get("iteration", 0)
            for tag, value in scalars(record).items():
                self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(record)

    def close(self) -> None:
        if self.enabled and self.jsonl is not None and not self.jsonl.closed:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.close()
