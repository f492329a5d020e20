"""Checkpoints that are never half-published.

Layout under `<output_dir>/checkpoints/`:
    iter_0000100/            one DeepSpeed checkpoint (the engine's own files) plus ours:
        model.safetensors    the full model weights (gathered under ZeRO-3 / expert parallelism), for export
        rng_rank<r>.pt       each rank's python/numpy/torch RNG states (tensors only; loaded with weights_only=True)
        complete.json        written last: iteration, consumed samples, the resolved config, every file and its size
    latest                   the newest complete tag; moved (atomic rename) only after every rank finished

Every rank writes into `.tmp-iter_0000100/`; after a barrier rank 0 renames it to its final name, writes
`complete.json`, then moves `latest`. A crash at any point leaves either the previous state or a `.tmp-` directory
that resume ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .collectives import all_ranks

TAG_RE = re.compile(r"^iter_(\d{7,})$")
MANIFEST = "complete.json"


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy(), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(iteration, dir) of every published checkpoint, oldest first."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = TAG_RE.match(child.name)
            if match and child.is_dir() and (child / MANIFEST).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def verify_manifest(directory: Path) -> dict[str, Any]:
    """Raise ValueError if the manifest is unreadable or a listed file is missing or has another size."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{directory}: unreadable {MANIFEST} ({err})") from err
    for rel, size in manifest.get("files", {}).items():
        path = directory / rel
        if not path.is_file():
            raise ValueError(f"{directory}: {rel} is missing")
        if path.stat().st_size != size:
            raise ValueError(f"{directory}: {rel} has {path.stat().st_size} bytes, the manifest says {size}")
    return manifest


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_ok(ok: bool) -> bool:
    """True only if `ok` on every rank (on the group's device: NCCL takes no CPU tensors)."""
    return all_ranks(ok)


def save_checkpoint(
    engine,
    root: Path,
    iteration: int,
    client_state: dict[str, Any],
    full_state_dict: Callable[[], dict[str, torch.Tensor] | None],
    keep_last: int,
) -> Path:
    """Save, publish atomically, prune to the newest `keep_last`. Every rank must call this."""
    from safetensors.torch import save_file

    rank = _rank()
    tag = tag_for(iteration)
    tmp_tag = f".tmp-{tag}"
    final = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-iter_*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a re-run of the same iteration after a resume: replace it
            shutil.rmtree(final)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), root / tmp_tag / f"rng_rank{rank}.pt")
    weights = full_state_dict()  # collective under ZeRO-3 / EP: every rank calls it; rank 0 gets the tensors
    if rank == 0:
        assert weights is not None
        save_file({k: v.contiguous() for k, v in weights.items()}, str(root / tmp_tag / "model.safetensors"),
                  metadata={"format": "pt"})
    _barrier()
    if rank == 0:
        os.replace(root / tmp_tag, final)
        files = {str(p.relative_to(final)): p.stat().st_size for p in sorted(final.rglob("*")) if p.is_file()}
        manifest = {"iteration": iteration, "files": files,
                    **{k: client_state[k] for k in ("consumed_samples", "consumed_tokens", "config", "model_config",
                                                    "tokenizer_dir") if k in client_state}}
        atomic_write_text(final / MANIFEST, json.dumps(manifest, indent=1))
        atomic_write_text(root / "latest", tag)
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_latest(engine, root: Path, load_optimizer: bool = True) -> tuple[int, dict[str, Any]] | None:
    """Load the newest complete checkpoint; fall back, with a warning, to older ones if it is corrupt.

    Returns (iteration, client_state), or None if there is no loadable checkpoint. Every rank must call this.
    """
    candidates = list(reversed(complete_checkpoints(root)))
    return _load_first(engine, candidates, load_optimizer)


def load_from(engine, directory: Path, load_optimizer: bool = True) -> tuple[int, dict[str, Any]]:
    match = TAG_RE.match(directory.name)
    if not match:
        raise ValueError(f"resume={directory}: not a checkpoint directory (iter_NNNNNNN)")
    loaded = _load_first(engine, [(int(match.group(1)), directory)], load_optimizer)
    if loaded is None:
        raise ValueError(f"resume={directory}: the checkpoint is incomplete or corrupt (see the warning above)")
    return loaded


def _load_first(engine, candidates: list[tuple[int, Path]], load_optimizer: bool):
    rank = _rank()
    for iteration, directory in candidates:
        error = None
        client_state: dict[str, Any] | None = None
        try:
            verify_manifest(directory)
            path, client_state = engine.load_checkpoint(
                str(directory.parent), tag=directory.name, load_optimizer_states=load_optimizer,
                load_lr_scheduler_states=load_optimizer)
            if path is None:
                raise ValueError("DeepSpeed found no checkpoint files")
            rng_file = directory / f"rng_rank{rank}.pt"
            if rng_file.is_file():
                set_rng_state(torch.load(rng_file, weights_only=True))
        except Exception as err:  # any failure to read is "corrupt": the caller falls back to an older checkpoint
            error = err
        if _all_ok(error is None):
            return iteration, client_state or {}
        if rank == 0:
            warnings.warn(f"checkpoint {directory} could not be loaded ({error or 'failed on another rank'}); "
                          f"falling back to the previous one", stacklevel=2)
    return None
