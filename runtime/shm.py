"""DeepSpeed's CPU shared-memory all-reduce segments: release them so runs do not leak RAM.

On CPU, when every rank is on one node, DeepSpeed's `deepspeed_shm_comm` op creates one POSIX shared-memory segment
per rank (`/dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}`, about 66 MiB each) and
never unlinks it. /dev/shm is RAM: every 2-rank run leaked ~140 MiB until the machine ran out of memory, and a later
run on the same port could map a dead run's segment before its owner re-created it.

Once every rank has mapped every peer's segment the names are no longer needed: each rank unlinks its own, the
mappings stay valid until the processes exit, and the kernel frees the memory then - even after SIGKILL.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch.distributed as dist

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer_"


def segment_path(rank: int) -> Path:
    """The segment DeepSpeed created for `rank` of the current job (named from MASTER_ADDR/MASTER_PORT)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{PREFIX}{os.getuid()}_{addr}_{port}_{rank}"


def release_own_segment() -> None:
    """After `deepspeed.init_distributed()`: wait until every rank has mapped its peers, then unlink this rank's
    segment name (nothing to do off CPU or across nodes, where DeepSpeed makes none)."""
    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return  # GPUs all-reduce through NCCL; the shm op belongs to DeepSpeed's CPU accelerator
    if os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return  # DeepSpeed creates the segments only when every rank is on this node (its own test)
    # Every rank leaves DeepSpeed's shm set-up only after opening all peers' segments; the barrier (plain gloo, not
    # the shm op) makes sure nobody unlinks a name that a slower peer has still to open.
    dist.barrier()
    segment_path(dist.get_rank()).unlink(missing_ok=True)


def mapped_segments() -> dict[str, bool]:
    """DeepSpeed shm segments that some live process of ours maps (from /proc/*/maps): name -> already unlinked."""
    mapped: dict[str, bool] = {}
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text(errors="replace")
        except OSError:  # the process ended or is not ours
            continue
        for line in text.splitlines():
            if PREFIX in line:
                name = line.rsplit("/", 1)[-1].split(" ")[0]
                mapped[name] = mapped.get(name, False) or line.endswith("(deleted)")
    return mapped


def remove_stale_segments(min_age_s: float = 60.0) -> list[Path]:
    """Unlink segments of this user that no live process maps and that are older than `min_age_s` (a run in its
    first instants may have created a segment it has not mapped yet): leftovers of runs that ended before this
    cleanup existed or were killed during start-up. Returns the paths removed."""
    if not SHM_DIR.is_dir():
        return []
    ours = [p for p in SHM_DIR.glob(f"{PREFIX}{os.getuid()}_*") if p.is_file()]
    if not ours:
        return []
    live = mapped_segments()
    now = time.time()
    removed = []
    for path in ours:
        if path.name not in live and now - path.stat().st_mtime > min_age_s:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
