"""Resuming a run, as both trainers do it: the settings check against the checkpoint's manifest (each trainer's
RESUME_POLICY), and the decisions none | auto | a checkpoint directory, with nothing written before a refusal."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

from runtime.checkpoint import (
    MANIFEST,
    CheckpointMismatch,
    SettingsCheck,
    StateLoader,
    agreed_iterations,
    load_from,
    load_latest,
    read_manifest,
    tag_for,
)
from runtime.config import IGNORE, REFUSE
from runtime.dist import rank
from runtime.errors import TrainingError
from runtime.reshard import Topology, cannot_reshard, needs_reshard
from runtime.sharedfs import FileWaitTimeout, wait_for_file

# Field -> (REFUSE | ALLOW | IGNORE, why): each trainer's RESUME_POLICY table (the decisions: runtime.config).
ResumePolicy = dict[str, tuple[str, str]]
# The world size is not a config field: it is refused only where the checkpoint's layout depends on it.
WORLD_SIZE_WHY = "the optimizer state is sharded over the data-parallel ranks"
# Fields that say how the state is laid out over the ranks: a trainer that reshards (runtime.reshard) allows them.
TOPOLOGY_FIELDS = ("zero_stage", "expert_parallel_size")


def _shown(value: Any) -> str:
    return json.dumps(value)


def _as_flag(name: str, value: Any) -> str:
    if value is None:
        text = "none"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, (dict, list)) and not (isinstance(value, list) and value):
        text = shlex.quote(json.dumps(value))
    elif isinstance(value, list):
        text = " ".join(shlex.quote(str(v)) for v in value)
    else:
        text = shlex.quote(str(value))
    return f"--{name} {text}"


def saved_world_size(manifest: dict[str, Any]) -> int | None:
    """The world size the checkpoint was written with (older manifests: one rng_rank<r>.pt per rank)."""
    if "world_size" in manifest:
        return int(manifest["world_size"])
    ranks = [rel for rel in manifest.get("files", {}) if re.fullmatch(r"rng_rank\d+\.pt", rel)]
    return len(ranks) or None


def resume_differences(
    directory: Path,
    manifest: dict[str, Any],
    config: dict[str, Any],
    world_size: int,
    policy: ResumePolicy,
    reshards: bool = False,
) -> tuple[str | None, list[str]]:
    """Compare this run's settings with those saved in the checkpoint's manifest, field by field under `policy`.

    `reshards`: the trainer loads a ZeRO-1/2 checkpoint on another world size, expert-parallel size or ZeRO stage
    (runtime.reshard); such a change is then one allowed line, "resume: resharded from ... to ...".
    Returns (the one-line refusal, or None; the "resume: FIELD OLD -> NEW" lines of the allowed changes)."""
    saved = manifest.get("config") or {}
    refused: list[tuple[str, Any, Any, str]] = []
    changed: list[str] = []
    saved_world = saved_world_size(manifest)
    saved_layout, layout = Topology.of(saved, saved_world or world_size), Topology.of(config, world_size)
    reshard_needed = reshards and needs_reshard(saved_layout, layout)
    resharded = reshard_needed and cannot_reshard(saved_layout, layout) is None
    if resharded:
        changed.append(f"resume: resharded from {saved_layout} to {layout}")
    for name, (decision, why) in policy.items():
        if name not in saved or name not in config or saved[name] == config[name] or decision == IGNORE:
            continue
        if resharded and name in TOPOLOGY_FIELDS:
            continue
        if decision == REFUSE:
            refused.append((name, saved[name], config[name], why))
        else:
            changed.append(f"resume: {name} {_shown(saved[name])} -> {_shown(config[name])}")
    world_refused = False
    if saved_world is not None and saved_world != world_size and not resharded:
        sharded = int(saved.get("zero_stage", 0)) >= 1 or int(saved.get("expert_parallel_size", 1)) > 1
        if sharded:
            world_refused = True
        else:
            changed.append(f"resume: world_size {saved_world} -> {world_size}")
    if not refused and not world_refused:
        return None, changed
    was = [f"{name}={_shown(old)}" for name, old, _, _ in refused]
    now = [f"{name}={_shown(new)}" for name, _, new, _ in refused]
    by_reason: dict[str, list[str]] = {}
    for name, _, _, why in refused:
        by_reason.setdefault(why, []).append(name)
    reasons = [f"{', '.join(names)}: {why}" for why, names in by_reason.items()]
    fixes = [_as_flag(name, old) for name, old, _, _ in refused]
    if world_refused:
        was.append(f"world_size={saved_world}")
        now.append(f"world_size={world_size}")
        reasons.append(f"world_size at ZeRO stage {saved.get('zero_stage')}: {WORLD_SIZE_WHY}")
        fixes.append(
            f"world size {saved_world} (NPROC={saved_world} for the launch scripts, --num_gpus "
            f"{saved_world} for deepspeed)"
        )
    if reshard_needed and not resharded:
        reasons.append(str(cannot_reshard(saved_layout, layout)))
    return (
        f"resume: checkpoint {directory} was written with {', '.join(was)} but this run has {', '.join(now)} "
        f"({'; '.join(reasons)}). Resume it with {' '.join(fixes)}, or start a new --output_dir"
    ), changed


def refuse_to_start_over(root: Path, resume: str, output_dir: str) -> None:
    """resume=none over a run's checkpoints would train a new run on top of them: refused, naming the fix."""
    existing = agreed_iterations(root)  # every rank decides alike, whatever its node sees yet
    if resume == "none" and existing:
        raise TrainingError(
            f"output_dir={output_dir!r} already holds checkpoints of a run (newest: {tag_for(existing[-1])}); pass "
            f"--resume auto to continue it, or choose another --output_dir"
        )


def check_resume_settings(root: Path, resume: str, check: SettingsCheck) -> None:
    """Refuse, before any set-up (nothing written yet), a resume whose settings differ from those saved with the
    checkpoint it would load (the loader checks again the one it actually loads, should it fall back)."""
    if resume == "none":
        return
    if resume == "auto":
        newest = agreed_iterations(root)[-1:]  # rank 0's newest: another node may see it late (waited for)
        if not newest:
            return
        directory = root / tag_for(newest[0])
    else:
        directory = Path(resume)
    try:
        if resume == "auto":
            wait_for_file(directory / MANIFEST)
        manifest = read_manifest(directory)
    except (ValueError, FileWaitTimeout):
        return  # an unreadable manifest is the loader's business (it falls back or refuses)
    refusal, _ = check(directory, manifest)
    if refusal is not None:
        raise TrainingError(refusal)


def resume_from(
    engine, root: Path, resume: str, check: SettingsCheck, load_state: StateLoader | None = None
) -> tuple[int, dict[str, Any], list[str]] | None:
    """Load what `resume` asks for (none | auto | a checkpoint directory). Returns (iteration, client_state, allowed
    setting changes), or None for a fresh start. Existing checkpoints that none loads are never started over on top
    of. `load_state`: how a checkpoint's state goes into the engine (runtime.checkpoint.engine_load by default).
    Every rank must call this."""
    if resume == "none":
        return None
    if resume == "auto":
        candidates = agreed_iterations(root)  # every rank starts from scratch, or none
        if not candidates:
            if rank() == 0:
                print(f"resume=auto: no complete checkpoint under {root}; starting from scratch", flush=True)
            return None
    try:
        if resume != "auto":
            return load_from(engine, Path(resume), check, load_state=load_state)
        loaded = load_latest(engine, root, check, load_state=load_state)
    except CheckpointMismatch as err:
        raise TrainingError(str(err)) from err
    if loaded is None:
        raise TrainingError(
            f"resume=auto: none of the {len(candidates)} checkpoints under {root} could be loaded (see the "
            f"warnings above); fix or move them, or choose another --output_dir"
        )
    return loaded
