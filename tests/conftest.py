import os
import sys
from collections.abc import Iterator

import pytest

# Tests never touch a hub; DeepSpeed's CPU op lives with the env (the Makefile sets the same).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".venv", "torch_extensions")
)
# ...built by this interpreter's ninja (the Makefile and launch/common.sh do the same): ninja 1.11 and 1.13 hash the
# build commands differently, so two ninjas taking turns rebuild the op every time (1-2 min each).
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Small ops on a shared 2-core machine: a second OpenMP thread that gets descheduled stalls every op (measured
    40x slower under load), while one thread is as fast as two on these shapes. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def no_stale_shared_memory() -> None:
    """/dev/shm is RAM: drop DeepSpeed shm segments that runs from before runtime.shm existed left behind."""
    from runtime.shm import remove_stale_segments

    removed = remove_stale_segments()
    if removed:
        print(f"\nconftest: removed {len(removed)} stale DeepSpeed shm segment(s) from /dev/shm")


@pytest.fixture(autouse=True)
def kill_leftover_launches() -> Iterator[None]:
    """A failed test must not leave its launcher and ranks running under the tests that follow."""
    yield
    from tests.trainer_utils import kill_leftovers

    kill_leftovers()
