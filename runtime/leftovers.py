"""Temporaries that a killed command left behind, and their removal by the next command that can prove their owner
dead.

Our writers build their output in a temporary sibling whose name says who owns it (a training run's checkpoint in
`checkpoints/.tmp-iter_N-<run token>/`, a `prepare` in `.prepare-<shard name>-XXXXXXXX/`) and publish it by a
rename; a SIGKILL, the OOM killer or a lost node in between leaves the temporary, which can hold a whole checkpoint.
Whoever holds the lock that admits one writer at a time (a run directory's `.run.lock`, a shard's `PREFIX.lock`)
knows that every other owner of such a name is dead, so it removes them and says what and how many bytes: never one
of its own, never a name of another form (anything we did not write stays).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path


def tree_bytes(path: Path) -> int:
    """The bytes of the files under `path` (links not followed; files that vanish while counting count nothing)."""
    total = 0
    for child in [path, *path.rglob("*")]:
        try:
            if not child.is_symlink() and child.is_file():
                total += child.stat().st_size
        except OSError:
            continue
    return total


def shown_bytes(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def remove_dead(directory: Path, pattern: re.Pattern[str], mine: str, why: str) -> list[str]:
    """Remove the directories in `directory` whose names match `pattern` all through, except those ending in `mine`
    (the caller's own: its run token, its own temporary's name); returns one line per removal: "removed PATH (SIZE),
    WHY". Call it only while holding the lock that proves their owners dead."""
    lines = []
    if not directory.is_dir():
        return lines
    for path in sorted(directory.iterdir()):
        if path.name.endswith(mine) or not pattern.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        size = tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            lines.append(f"removed {path} ({shown_bytes(size)}), {why}")
    return lines
