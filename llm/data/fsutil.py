"""Small file-system helpers shared by the data modules: atomic publication and inter-process locks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_path_for(path: str | Path) -> Path:
    """A unique sibling name for `path`, so the final rename stays on one file system (rename is atomic there)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; published files get the usual permissions
    return Path(tmp)


def temp_dir_for(path: str | Path) -> Path:
    """A unique sibling directory for building `path` before `publish_dir`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o777 & ~_umask())
    return Path(tmp)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def publish_dir(tmp_dir: str | Path, final_dir: str | Path) -> None:
    """Replace `final_dir` by `tmp_dir`: a reader sees the old complete directory or the new one, never a mix."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = None
    if final_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.old.", dir=final_dir.parent))
        os.rename(final_dir, old / final_dir.name)
    os.rename(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def file_lock(lock_path: str | Path) -> Iterator[None]:
    """Exclusive advisory lock (fcntl): two ranks or two pytest processes building the same files wait in turn.

    The kernel drops the lock when the process dies, so a crashed builder never leaves the others stuck.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def writable_dir(path: str | Path) -> bool:
    """True when files can be created in `path` (creating it if needed)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)
