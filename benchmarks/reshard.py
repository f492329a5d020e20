"""What resharding costs (issue 22): a checkpoint's bytes by kind, the extra bytes and save time per checkpoint
(none: the resume reads DeepSpeed's shards as written), and the read at a resharded resume, measured for tiny and
computed for the 1B presets at 8 and 64 GPUs. Prints JSON.

    .venv/bin/python benchmarks/reshard.py                      # trains a tiny 2-rank EP-2 ZeRO-2 run to measure
    .venv/bin/python benchmarks/reshard.py --checkpoint RUN/checkpoints/iter_0000004
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Bytes per parameter in a ZeRO-1/2 checkpoint of a bf16 run: the shards hold the fp32 master weight and both Adam
# moments (12); DeepSpeed's module file (rank 0) and our model.safetensors each hold the bf16 weights (2 + 2).
SHARD_BYTES, MODULE_BYTES, WEIGHTS_BYTES = 12, 2, 2


# The benchmark's own small run (hidden 64, 2 layers): what a checkpoint of it holds is the figure, not its quality.
TINY_FLAGS = [
    "--seq_len", "32", "--micro_batch_size", "2", "--global_batch_size", "8", "--log_interval", "1",
    "--eval_interval", "1000", "--eval_iters", "1", "--warmup_iters", "2", "--progress_bar", "false",
    "--model_overrides",
    '{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, '
    '"num_key_value_heads": 4}',
]  # fmt: skip


def tiny_checkpoint(root: Path) -> Path:
    out = root / "run"
    env = {**os.environ, "NPROC": "2"}
    cmd = ["bash", "launch/pretrain_llama.sh", "parameternet", "--output_dir", str(out), *TINY_FLAGS]
    cmd += ["--train_iters", "4", "--save_interval", "2", "--zero_stage", "2", "--expert_parallel_size", "2"]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return out / "checkpoints" / "iter_0000004"


def kind(name: str) -> str:
    if "optim_states" in name:
        return "zero_shards"
    if name.endswith("model_states.pt"):
        return "module"
    if name == "model.safetensors":
        return "full_weights"
    return "other"


def tensors(value) -> list:
    import torch

    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


def measure(checkpoint: Path, repeats: int) -> dict:

    from llm.reshard import read_state
    from runtime.reshard import _load

    sizes: dict[str, int] = {}
    for path in checkpoint.iterdir():
        if path.is_file():
            sizes[kind(path.name)] = sizes.get(kind(path.name), 0) + path.stat().st_size
    shards = sorted(checkpoint.glob("*optim_states.pt"))
    own, whole = [], []
    for _ in range(repeats):  # interleaved: a same-topology load reads its rank's shard; a resharded one every piece
        start = time.perf_counter()
        touched = [t.sum() for t in tensors(_load(shards[0]))]  # memory-mapped: read when touched
        own.append(time.perf_counter() - start)
        assert touched
        start = time.perf_counter()
        state, _ = read_state(checkpoint)
        whole.append(time.perf_counter() - start)
    params = sum(v.numel() for k, v in state.items() if k.endswith("/fp32"))
    # What a topology-free copy written at every save (DeepSpeed's universal layout, or ours) would add to each save.
    from runtime.fsutil import save_safetensors_atomic

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        save_safetensors_atomic({k: v.contiguous() for k, v in state.items()}, Path(tmp) / "state.safetensors")
        copy_s = time.perf_counter() - start
        copy_bytes = (Path(tmp) / "state.safetensors").stat().st_size
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "checkpoint": str(checkpoint),
        "parameters": params,
        "bytes": sizes,
        "extra_bytes_per_checkpoint": 0,
        "extra_save_s": 0.0,
        "a_universal_copy_would_add_bytes": copy_bytes,
        "a_universal_copy_would_add_save_s": round(copy_s, 4),
        "read_own_shard_s": round(median(own), 4),
        "read_whole_state_s": round(median(whole), 4),
        "whole_state_bytes_read_per_rank": 12 * params,
    }


def computed(params: int, gpus: int, gpus_per_node: int = 8) -> dict:
    gib = 2**30
    nodes = max(gpus // gpus_per_node, 1)
    return {
        "gpus": gpus,
        "checkpoint_gib": round(params * (SHARD_BYTES + MODULE_BYTES + WEIGHTS_BYTES) / gib, 1),
        "extra_gib_per_checkpoint": 0.0,
        "universal_copy_would_add_gib": round(params * SHARD_BYTES / gib, 1),
        "same_topology_read_gib_per_rank": round(params * SHARD_BYTES / gpus / gib, 2),
        # Every rank reads every parameter's whole state; a node's ranks share the page cache.
        "resharded_read_gib_per_node": round(params * SHARD_BYTES / gib, 1),
        "resharded_read_gib_total": round(params * SHARD_BYTES * nodes / gib, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a ZeRO-1/2 checkpoint (default: train a tiny one)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    from llm.model import build_model, load_model_config

    with tempfile.TemporaryDirectory() as tmp:
        result = {"tiny": measure(args.checkpoint or tiny_checkpoint(Path(tmp)), args.repeats)}
    for preset in ("llama-1b", "parameternet-llama-1b"):
        with torch.device("meta"):
            params = sum(p.numel() for p in build_model(load_model_config(preset)).parameters())
        result[preset] = {"parameters": params, "at": [computed(params, gpus) for gpus in (8, 64)]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
