"""Reading what another rank or node wrote, on a shared file system.

On NFS or Lustre a file that one node has written can appear on another node seconds later (attribute and directory
caches). Where a rank reads a file that another rank wrote and sees (a checkpoint's manifest and files at resume, the
data index cache), it waits for the file, bounded, and when the wait expires says which file did not appear and what
to do - as OLMo-core and MosaicML streaming wait on shared file systems. `PARAMETERNET_FILE_WAIT_S` sets the bound
(60 s by default).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

WAIT_ENV = "PARAMETERNET_FILE_WAIT_S"
DEFAULT_WAIT_S = 60.0


class FileWaitTimeout(FileNotFoundError):
    """A file that another rank wrote did not appear here within the bound (a FileNotFoundError: one line, exit 2)."""


def file_wait_s() -> float:
    """The bound of every wait: $PARAMETERNET_FILE_WAIT_S seconds, else DEFAULT_WAIT_S."""
    text = os.environ.get(WAIT_ENV, "").strip()
    if not text:
        return DEFAULT_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{WAIT_ENV}={text!r}: give the seconds to wait for a file, e.g. {WAIT_ENV}=120")
    return value


def wait_for_file(path: str | Path, timeout: float | None = None, writer: str = "another rank") -> Path:
    """Return `path` once it exists (at once when it does), polling with a growing pause up to `timeout` seconds
    (default `file_wait_s()`); raise FileWaitTimeout naming the file when it expires. Call it only for a file that
    `writer` is known to have written: a file that nobody wrote costs the whole wait."""
    path = Path(path)
    if path.exists():
        return path
    limit = file_wait_s() if timeout is None else timeout
    deadline = time.monotonic() + limit
    pause = 0.05
    while True:
        with contextlib.suppress(OSError):
            os.listdir(path.parent)  # NFS: reading the directory revalidates its cached entries
        if path.exists():
            return path
        left = deadline - time.monotonic()
        if left <= 0:
            raise FileWaitTimeout(
                f"{path} did not appear within {limit:g} s, although {writer} wrote it: on a shared file system (NFS, "
                f"Lustre) files reach other nodes late. Check that every node mounts the same directory, or wait "
                f"longer with {WAIT_ENV}=SECONDS"
            )
        time.sleep(min(pause, left))
        pause = min(pause * 2, 1.0)
