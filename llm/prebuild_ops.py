"""Compile DeepSpeed's CPU communication op once, at install time, into TORCH_EXTENSIONS_DIR.

On a machine without a GPU DeepSpeed JIT-compiles `deepspeed_shm_comm` the first time a process group starts (about
two minutes on two cores). Doing it here keeps that cost out of the first training run and out of every test.
On a GPU machine there is nothing to do.
"""

from __future__ import annotations

import os
import time


def main() -> None:
    import torch

    if torch.cuda.is_available():
        print("prebuild_ops: CUDA present, nothing to prebuild")
        return
    from deepspeed.comm.torch import build_shm_op

    start = time.time()
    op = build_shm_op()
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
    state = "ready" if op is not None else "not compatible on this machine (DeepSpeed falls back to gloo)"
    print(f"prebuild_ops: deepspeed_shm_comm {state} in {time.time() - start:.0f}s ({where})")


if __name__ == "__main__":
    main()
