"""Starting a training process: the rank environment, torch.distributed through DeepSpeed, CPU threads, stop signals.

Works under the deepspeed launcher, torchrun, an srun step with one task per rank, or a plain `python` (a world of
one). Collectives themselves live in runtime.collectives.
"""

from __future__ import annotations

import os
import signal
import socket

import torch
import torch.distributed as dist

from runtime.shm import release_own_segment
from runtime.slurm import rank_env


def free_port() -> int:
    """A TCP port nobody listens on now (the rendezvous of a single-process world)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_rank_env() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* where no launcher did: from SLURM's task ids in an srun step with one
    task per rank, else a world of one (without them DeepSpeed tries MPI discovery)."""
    os.environ.update(rank_env(os.environ))
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def set_cpu_threads() -> None:
    """Without a GPU, ranks on one node share its cores: give each its share (unless OMP_NUM_THREADS says)."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def init_distributed() -> None:
    """Start torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU), then release DeepSpeed's CPU
    shared-memory segment names (runtime.shm)."""
    import deepspeed

    ensure_rank_env()
    if not dist.is_initialized():
        deepspeed.init_distributed()
        release_own_segment()


def launcher_world_size() -> int:
    """The world size the launcher set (or SLURM's task count in an srun step), read before any process group."""
    return int({**os.environ, **rank_env(os.environ)}.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, saves a checkpoint and exits 0 (SLURM preemption,
    requeue, `timeout`, the launch scripts' stop request).

    The flag reaches the other ranks inside the step's one all-reduce, not in a collective of its own: a signal is
    seen at the end of the step running when it arrives, or of the next one."""

    def __init__(self) -> None:
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.raised = True

    @staticmethod
    def stop_listening() -> None:
        """Before the interpreter shuts down: the launch script repeats its stop request until the ranks exit, and
        Python restores the default (fatal) action for handled signals while it shuts down."""
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
