"""Training checkpoints on the DeepSpeed engine, published atomically, and weight files for the next stage.

Layout of a run directory:
    checkpoints/step00000120/   engine.save_checkpoint (module, optimizer shards, scheduler, client state)
    checkpoints/latest          the tag of the newest *complete* checkpoint; written last, by rename
    model.safetensors           final weights (fp32) - what `--init-from` of the fine-tuning stage reads
    model_ema.safetensors       final EMA weights, when EMA is on

DeepSpeed's own `latest` file is written in place; we pass save_latest=False and move the pointer ourselves, after a
barrier, so a run killed mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from runtime import fsutil

LATEST = "latest"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"


def step_tag(global_step: int) -> str:
    return f"step{global_step:08d}"


def write_text_atomic(path: Path, text: str) -> None:
    """Published by rename with the umask's mode (runtime.fsutil)."""
    fsutil.write_text_atomic(path, text)


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def latest_tag(ckpt_dir: Path) -> str | None:
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{pointer} names checkpoint {tag!r}, but {ckpt_dir / tag} is missing")
    return tag


def save_checkpoint(
    engine: Any,
    ckpt_dir: Path,
    global_step: int,
    client_state: dict[str, Any],
    keep: int,
    extra_files: dict[str, str] | None = None,
) -> str:
    """All ranks call this. `extra_files` (name -> text) land in the tag directory before it is published."""
    tag = step_tag(global_step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if dist.get_rank() == 0:
        for name, text in (extra_files or {}).items():
            write_text_atomic(ckpt_dir / tag / name, text)
    dist.barrier()  # every rank's shard is on disk before the pointer moves
    if dist.get_rank() == 0:
        write_text_atomic(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep, tag)
    dist.barrier()
    return tag


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    for tag in tags:
        if tag != current and tag not in tags[-keep:]:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """fp32 safetensors, written to a temporary name and renamed."""
    tensors = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state_dict.items()}
    fsutil.save_safetensors_atomic(tensors, path, metadata=metadata)


def resolve_init_weights(init_from: str, use_ema: bool) -> Path:
    path = Path(init_from)
    if path.is_dir():
        name = EMA_WEIGHTS if use_ema else WEIGHTS
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"init_from={init_from!r}: {path / name} is missing; the run did not finish (resume it first), "
                f"or {'EMA was off in that run (drop --init-from-ema)' if use_ema else 'give the .safetensors path'}"
            )
        return path / name
    if not path.is_file():
        raise FileNotFoundError(f"init_from={init_from!r} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"init_from={init_from!r}: expected a .safetensors file or a run directory")
    return path


def classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier", "classifier")
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def load_init_weights(model: torch.nn.Module, path: Path, keep_classifier: bool = False) -> list[str]:
    """Load a previous stage's weights into `model`; return the names of the tensors left freshly initialised.

    The classifier starts fresh (a new label set) unless `keep_classifier`. Any other missing, unexpected or
    mis-shaped tensor is an error: it would mean another architecture, not another label set.
    """
    state = load_file(str(path))
    own = model.state_dict()
    heads = classifier_prefixes(model)
    reinit = [] if keep_classifier else [k for k in own if k.startswith(heads)]
    if not keep_classifier:
        state = {k: v for k, v in state.items() if not k.startswith(heads)}
    mismatched = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    missing = sorted(set(own) - set(state) - set(reinit))
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        detail = "; ".join(
            f"{label}: {names[:5]}{' ...' if len(names) > 5 else ''}"
            for label, names in (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected))
            if names
        )
        hint = " (keep_classifier needs the same num_classes)" if keep_classifier else ""
        raise ValueError(
            f"init_from={str(path)!r} does not fit model {type(model).__name__} ({detail}); fine-tune the same model "
            f"name, num_experts and in_chans as the run that produced it{hint}"
        )
    model.load_state_dict(state, strict=False)
    return reinit
