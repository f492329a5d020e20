"""A checkpoint's optimizer state without its topology: every parameter whole, the experts of all ranks included.

    python -m llm.reshard RUN_DIR_OR_CHECKPOINT OUT.safetensors
    python -m llm.reshard RUN_DIR_OR_CHECKPOINT --check

The trainer needs neither: `--resume` on another world size, expert-parallel size or ZeRO stage (1 <-> 2) reads the
checkpoint's ZeRO shards itself (runtime.reshard), checkpoints written before that existed included. This command
writes what that reads - for every parameter `NAME/fp32` (the master weight), `NAME/exp_avg`, `NAME/exp_avg_sq` and
`NAME/step`, expert tensors whole ([E, ...]) - for inspection or other tools; `--check` only says, without a GPU or
a process group, whether a checkpoint can be resharded, before a job is submitted on another topology.
Checksums are verified first. OUT must not exist (nothing is overwritten), nor lie in a run's checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from runtime.errors import print_error


def read_state(checkpoint: Path) -> tuple[dict[str, torch.Tensor], str]:
    """({NAME/fp32|exp_avg|exp_avg_sq|step: tensor}, what was read); ValueError naming why it cannot be read."""
    from runtime.checkpoint import read_manifest, verify_files
    from runtime.reshard import MODEL_STATES, SavedZeroState, Topology, _load, cannot_reshard
    from runtime.resume import saved_world_size

    manifest = read_manifest(checkpoint)
    topology = Topology.of(manifest.get("config") or {}, saved_world_size(manifest) or 1)
    refusal = cannot_reshard(topology, topology)
    if refusal is not None:
        raise ValueError(f"{checkpoint}: {refusal} (zero_stage={topology.zero_stage} in its complete.json)")
    verify_files(checkpoint, manifest)
    state = SavedZeroState(checkpoint, topology)
    shapes = {
        name: shape for group in _load(checkpoint / MODEL_STATES)["param_shapes"] for name, shape in group.items()
    }
    out: dict[str, torch.Tensor] = {}
    for name in sorted(state.names()):
        shape = tuple(shapes[name])
        if state.is_expert(name):  # rank 0's experts: the whole tensor has expert_parallel_size times as many
            shape = (shape[0] * topology.expert_parallel_size, *shape[1:])
        out[f"{name}/fp32"] = state.full(name, None, shape)
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}/{key}"] = state.full(name, key, shape)
        out[f"{name}/step"] = state.steps[name].reshape(1).clone()  # one per parameter, not shared
    return out, f"{len(state.names())} parameters of {topology}, iteration {manifest.get('iteration')}"


def check_out(out: Path) -> None:
    """OUT must not exist, nor lie in a training run's checkpoints (the rule export follows: runtime.fsutil)."""
    from runtime.fsutil import claim_output

    if out.exists() or out.is_symlink():
        raise FileExistsError(f"OUT={out} exists; choose a new file (nothing is overwritten)")
    claim_output(out, overwrite=False, flag="OUT", tool="llm.reshard", proof=out, files=[out])


def write_out(state: dict[str, torch.Tensor], out: Path, checkpoint: Path) -> None:
    """Write OUT atomically; a file-system error names OUT, not the temporary file beside it."""
    from runtime.checkpoint import disk_full
    from runtime.fsutil import save_safetensors_atomic

    try:
        save_safetensors_atomic({k: v.contiguous() for k, v in state.items()}, out, {"checkpoint": str(checkpoint)})
    except Exception as err:  # safetensors' SafetensorError (a full disk among them) is no OSError
        if not isinstance(err, OSError) and not disk_full(err):
            raise
        cause = "No space left on device" if disk_full(err) else (err.strerror or str(err))
        raise OSError(f"OUT={out}: cannot be written ({cause}); choose a writable directory with room for it") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.reshard", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a checkpoint directory")
    parser.add_argument("out", nargs="?", help="the .safetensors file to write (must not exist)")
    parser.add_argument("--check", action="store_true", help="only verify that the checkpoint can be resharded")
    args = parser.parse_args(argv)
    if (args.out is None) == (not args.check):
        parser.error("give OUT.safetensors or --check (one of them)")
    try:
        from llm.export import find_checkpoint

        checkpoint = find_checkpoint(args.checkpoint)
        if args.out is not None:
            check_out(Path(args.out))
        state, what = read_state(checkpoint)
        if args.out is not None:
            write_out(state, Path(args.out), checkpoint)
    except (OSError, ValueError) as err:
        print_error(str(err), prog="llm.reshard")
        return 1
    print(f"{checkpoint}: {what}: {'can be resharded' if args.check else f'written to {args.out}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
