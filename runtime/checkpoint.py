"""Checkpoints that are never half-published: the protocol both trainers use.

Layout under `<output_dir>/checkpoints/`:
    iter_0000100/            one DeepSpeed checkpoint (the engine's own files) plus ours:
        rng_rank<r>.pt       each rank's python/numpy/torch(/cuda) RNG states (tensors only; weights_only=True)
        ...                  files of the trainer's `extra` hook (llm: model.safetensors, the full gathered weights)
        complete.json        written last: iteration, world size, the resolved config, the trainer's manifest keys,
                             and every file with its size and checksum
    latest                   the newest complete tag; moved (atomic rename) only after every rank finished

Every rank writes into `.tmp-iter_0000100-<run token>/` (runtime.rundir.claim_run_dir: the same on every rank of
this run, another for every run); after a barrier rank 0 reads every file back once to checksum it, renames the
directory to its final name, writes `complete.json`, then moves `latest`. A crash at any point leaves either the
previous state or a `.tmp-` directory that resume ignores. A save removes only this run's own temporary directories;
those of other tokens are removed once, at start, by the run that holds runtime.rundir's lock, which proves their
owners dead (`remove_dead_saves`). A save that fails - the disk full, above all - removes its temporary
directory and raises TrainingError naming the cause and what is kept (`latest` has not moved).

Loading verifies sizes and checksums before the engine reads anything: a file that differs is corruption, and resume
falls back to the previous checkpoint. A checkpoint of another shape (other model, seq_len, world size...) is not
corruption: runtime.resume names what differs, and the trainer refuses it according to its RESUME_POLICY table
(field -> REFUSE | ALLOW | IGNORE and why; llm/train/config.py, vision/config.py).
"""

from __future__ import annotations

import errno
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

from runtime.collectives import all_ranks, any_rank, rank0_ints
from runtime.dist import barrier, rank, world_size
from runtime.errors import TrainingError
from runtime.fsutil import make_public, write_text_atomic
from runtime.sharedfs import FileWaitTimeout, wait_for_file

TAG_RE = re.compile(r"^iter_(\d{7,})$")
TMP_RE = re.compile(r"\.tmp-iter_\d{7,}-[0-9a-f]{12}")  # a save's temporary: .tmp-<tag>-<run token>
MANIFEST = "complete.json"


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def remove_dead_saves(root: Path, run_token: str) -> list[str]:
    """For rank 0 of the run that holds the run directory's lock: remove the temporary directories of saves that
    another run's death interrupted (a SIGKILL, the OOM killer, a lost node mid-save; a failed save removes its own).
    The lock admits one live run per directory, so another token's temporary has no live owner. Returns one line per
    removal (what, how many bytes)."""
    from runtime.leftovers import remove_dead

    why = "the unfinished save of a run that is no longer alive (it does not hold the run's lock)"
    return remove_dead(root, TMP_RE, f"-{run_token}", why)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
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


# xxHash3 (128 bits) reads ~8 GB/s on one core, blake2b ~0.5 GB/s: checksumming a checkpoint costs a fraction of
# writing it. It comes with `datasets` (a dependency of ours). The manifest names the algorithm it used.
CHECKSUM = "xxh3_128"


def file_checksum(path: Path) -> str:
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    """The checkpoint's manifest; ValueError if it is unreadable."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{directory}: unreadable {MANIFEST} ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise ValueError(f"{directory}: {MANIFEST} is not a checkpoint manifest")
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any], rank: int = 0, world_size: int = 1) -> None:
    """Raise ValueError if a listed file is missing, has another size, or (for this rank's share of the files: the
    ranks split the reading) another checksum. Manifests written before checksums were recorded give sizes only:
    those are checked, with a warning."""
    sizes_only = []
    for index, (rel, entry) in enumerate(sorted(manifest.get("files", {}).items())):
        path = directory / rel
        if not path.is_file():
            raise ValueError(f"{directory}: {rel} is missing")
        size = entry if isinstance(entry, int) else entry["bytes"]
        if path.stat().st_size != size:
            raise ValueError(f"{directory}: {rel} has {path.stat().st_size} bytes, the manifest says {size}")
        if isinstance(entry, int):
            sizes_only.append(rel)
        elif index % world_size == rank:
            algorithm = manifest.get("checksum", CHECKSUM)
            if algorithm != CHECKSUM:
                raise ValueError(f"{directory}: {MANIFEST} uses checksum {algorithm!r}; this version reads {CHECKSUM}")
            got = file_checksum(path)
            if got != entry[CHECKSUM]:
                raise ValueError(
                    f"{directory}: {rel} does not match its {CHECKSUM} checksum in {MANIFEST} "
                    f"({got} != {entry[CHECKSUM]}): its content changed after it was written"
                )
    if sizes_only and rank == 0:
        warnings.warn(
            f"{directory}: {MANIFEST} was written before checksums were recorded; only the sizes of its "
            f"{len(sizes_only)} files are checked",
            stacklevel=2,
        )


class CheckpointMismatch(ValueError):
    """The checkpoint is intact but was written by another kind of run: refused, never a reason to fall back."""


# Called on every rank with the temporary checkpoint directory, after the engine's files are written and before the
# manifest: writes the trainer's own files there (llm: the full gathered weights; may be collective).
ExtraFiles = Callable[[Path], None]


def save_checkpoint(
    engine,
    root: Path,
    iteration: int,
    client_state: dict[str, Any],
    keep_last: int,
    config: dict[str, Any],
    manifest_extra: dict[str, Any] | None = None,
    extra: ExtraFiles | None = None,
    *,
    run_token: str,
) -> Path:
    """Save, publish atomically, prune to the newest `keep_last`. Every rank must call this.

    `config` (the resolved training config) and `manifest_extra` go into the manifest, where resume reads them.
    `run_token` (RunClaim.token) names this run's temporary directory."""
    this_rank = rank()
    tag = tag_for(iteration)
    tmp_tag = f".tmp-{tag}-{run_token}"
    final = root / tag
    if this_rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".tmp-iter_*-{run_token}"):  # an earlier failed save of this run
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a re-run of the same iteration after a resume: replace it
            shutil.rmtree(final)
    barrier()
    error: BaseException | None = None
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), root / tmp_tag / f"rng_rank{this_rank}.pt")
        if extra is not None:
            extra(root / tmp_tag)
    except Exception as err:  # torch's writer says RuntimeError for a full disk, safetensors SafetensorError
        error = err
    if not all_ranks(error is None):  # also the barrier before publishing
        if this_rank == 0:
            shutil.rmtree(root / tmp_tag, ignore_errors=True)
        if error is not None and not disk_full(error):
            raise error  # a bug, not the user's to fix: its traceback
        raise TrainingError(save_failure(root, tag, error))
    failure: OSError | None = None
    if this_rank == 0:
        manifest = {"iteration": iteration, "world_size": world_size(), "config": config, **(manifest_extra or {})}
        try:
            _publish(root / tmp_tag, final, manifest, keep_last)
        except OSError as err:  # the manifest or `latest` could not be written: the disk is full, most likely
            failure = err
            shutil.rmtree(root / tmp_tag, ignore_errors=True)
            if not (final / MANIFEST).is_file():
                shutil.rmtree(final, ignore_errors=True)
    if not all_ranks(failure is None):  # also the barrier that keeps the ranks together until `latest` moved
        raise TrainingError(save_failure(root, tag, failure))
    return final


def _publish(tmp: Path, final: Path, manifest: dict[str, Any], keep_last: int) -> None:
    """Rank 0: checksum the files, rename the directory to its final name, write the manifest, move `latest`,
    prune to the newest `keep_last`."""
    root = final.parent
    # Read back once, right after writing (from the page cache, usually): the checksums of the bytes written.
    # Published with the umask's mode (safetensors, for one, writes 0600 whatever the umask).
    files = {}
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            make_public(path)
            files[str(path.relative_to(tmp))] = {"bytes": path.stat().st_size, CHECKSUM: file_checksum(path)}
    os.replace(tmp, final)
    manifest = {**manifest, "checksum": CHECKSUM, "files": files}
    write_text_atomic(final / MANIFEST, json.dumps(manifest, indent=1))
    write_text_atomic(root / "latest", final.name)
    for _, old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def disk_full(error: BaseException | None) -> bool:
    """Is `error` (or an error it was raised from) a full disk? torch's zip writer loses the errno and says only
    "unexpected pos" or "file write failed"."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "unexpected pos" in text or "file write failed" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def kept_checkpoint(root: Path) -> str:
    """What a failed save leaves to resume from, for its message."""
    done = complete_checkpoints(root)
    if not done:
        return "no checkpoint of this run is kept yet"
    return f"the newest complete checkpoint, {done[-1][1]}, is kept (--resume auto continues from it)"


def save_failure(root: Path, tag: str, error: BaseException | None) -> str:
    """The one line a failed save raises: the cause, where, what is kept, the fix."""
    if error is None:
        return f"saving checkpoint {tag} under {root} failed on another rank (see its message); {kept_checkpoint(root)}"
    if disk_full(error):
        free = shutil.disk_usage(root).free / 2**20
        return (
            f"No space left on device under {root} while saving checkpoint {tag} ({free:.0f} MiB free); its partial "
            f"files were removed and {kept_checkpoint(root)}. Free some space (or lower --keep_last), then run the "
            f"same command with --resume auto"
        )
    return (
        f"saving checkpoint {tag} under {root} failed: {type(error).__name__}: {error}; its partial files were "
        f"removed and {kept_checkpoint(root)}"
    )


# Compares a checkpoint's manifest with this run: (the refusal or None, the allowed changes). See resume_differences.
SettingsCheck = Callable[[Path, dict[str, Any]], tuple[str | None, list[str]]]


def load_latest(
    engine, root: Path, check: SettingsCheck, load_optimizer: bool = True, load_state: StateLoader | None = None
) -> tuple[int, dict[str, Any], list[str]] | None:
    """Load the newest complete checkpoint; fall back, with a warning, to older ones if it is corrupt.

    Returns (iteration, client_state, the allowed setting changes), or None if there is no loadable checkpoint.
    Raises CheckpointMismatch if `check` refuses the checkpoint it would load. Every rank must call this.
    """
    candidates = [(i, root / tag_for(i)) for i in reversed(agreed_iterations(root))]
    return _load_first(engine, candidates, check, load_optimizer, load_state)


def agreed_iterations(root: Path) -> list[int]:
    """The iterations of the complete checkpoints under `root` as rank 0 sees them, on every rank (a collective):
    another node may see a new checkpoint late, and ranks that tried different checkpoints would wait for each other
    forever. `_load_first` waits for the files of the one they try."""
    return rank0_ints([iteration for iteration, _ in complete_checkpoints(root)])


def load_from(
    engine, directory: Path, check: SettingsCheck, load_optimizer: bool = True, load_state: StateLoader | None = None
) -> tuple[int, dict[str, Any], list[str]]:
    match = TAG_RE.match(directory.name)
    if not match:
        raise ValueError(f"resume={directory}: not a checkpoint directory (iter_NNNNNNN)")
    loaded = _load_first(engine, [(int(match.group(1)), directory)], check, load_optimizer, load_state)
    if loaded is None:
        raise ValueError(f"resume={directory}: the checkpoint is incomplete or corrupt (see the warning above)")
    return loaded


def engine_load(engine, directory: Path, manifest: dict[str, Any], load_optimizer: bool = True) -> dict[str, Any]:
    """The engine's own load of a checkpoint written on this topology; returns its client state."""
    path, client_state = engine.load_checkpoint(
        str(directory.parent),
        tag=directory.name,
        load_optimizer_states=load_optimizer,
        load_lr_scheduler_states=load_optimizer,
    )
    if path is None:
        raise ValueError("DeepSpeed found no checkpoint files")
    return client_state


# Loads a verified checkpoint's state into the engine, returns the client state: engine_load, or a trainer's own
# (the LLM trainer's reshards a checkpoint of another topology, runtime.reshard). A failure reads as corruption.
StateLoader = Callable[[Any, Path, dict[str, Any], bool], dict[str, Any]]


def _load_first(
    engine,
    candidates: list[tuple[int, Path]],
    check: SettingsCheck,
    load_optimizer: bool,
    load_state: StateLoader | None = None,
):
    this_rank, world = rank(), world_size()
    for iteration, directory in candidates:
        error = None
        client_state: dict[str, Any] | None = None
        changes: list[str] = []
        # What another rank sees was written: here it may be late (a shared file system), so it is waited for.
        seen = any_rank((directory / MANIFEST).is_file())
        try:
            if seen:
                wait_for_file(directory / MANIFEST)
            manifest = read_manifest(directory)
        except (ValueError, FileWaitTimeout) as err:
            manifest, error = None, err
        # Every rank read the same manifest; deciding together keeps a rank that could not from waiting alone.
        refusal, changes = check(directory, manifest) if manifest is not None else (None, [])
        if not all_ranks(refusal is None):
            raise CheckpointMismatch(refusal or f"resume: checkpoint {directory} was refused on another rank")
        files = manifest.get("files", {}) if manifest is not None else None
        whole = any_rank(files is not None and all((directory / rel).is_file() for rel in files))
        try:
            if error is not None:
                raise error
            if whole:
                for rel in manifest.get("files", {}):
                    wait_for_file(directory / rel)
            verify_files(directory, manifest, this_rank, world)  # every rank checksums its share of the files
            client_state = (load_state or engine_load)(engine, directory, manifest, load_optimizer)
            rng_file = directory / f"rng_rank{this_rank}.pt"
            if rng_file.is_file():
                set_rng_state(torch.load(rng_file, weights_only=True))
        except Exception as err:  # any failure to read is "corrupt": the caller falls back to an older checkpoint
            error = err
        if all_ranks(error is None):
            return iteration, client_state or {}, changes
        if error is not None or this_rank == 0:
            warnings.warn(
                f"checkpoint {directory} could not be loaded ({error or 'failed on another rank'}); "
                f"falling back to the previous one",
                stacklevel=2,
            )
    return None
