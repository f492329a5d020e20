"""Small file-system helpers shared by every tool that writes files: atomic publication with the permissions the
user's umask gives, inter-process locks (`file_lock` to take turns, `ExclusiveLock` to refuse a second writer), and
the one rule for claiming an output path (`claim_output`)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# A training run is recognised by these, at the output path or up to two levels below it (a run directory, the
# directory of a model's seeds, the directory of several models); `latest`/`complete.json` mark a checkpoints
# directory or one checkpoint.
_RUN_SIGNS = ("checkpoints", "*/checkpoints", "*/*/checkpoints", "complete.json", "latest", "iter_*/complete.json")


class OutputRefused(ValueError):
    """An output path that a command must not write (see `claim_output`)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """What `open(path, 'w')` would give a new file: 0o666 less the umask (0o644 under umask 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def make_public(path: str | Path) -> None:
    """Give `path` (a file, or a directory and everything in it) the modes a plain `open`/`mkdir` would.

    mkstemp/mkdtemp create 0600/0700, and safetensors' save_file (hence `save_pretrained`) writes its file 0600
    whatever mode the file had: on a shared cluster teammates could not read the weights.
    """
    path = Path(path)
    if path.is_dir():
        os.chmod(path, dir_mode())
        for child in path.rglob("*"):
            if not child.is_symlink():
                os.chmod(child, dir_mode() if child.is_dir() else file_mode())
    else:
        os.chmod(path, file_mode())


def temp_path_for(path: str | Path) -> Path:
    """A unique sibling name for `path`, so the final rename stays on one file system (rename is atomic there)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, file_mode())  # mkstemp creates 0600; published files get the usual permissions
    return Path(tmp)


def temp_dir_for(path: str | Path) -> Path:
    """A unique sibling directory for building `path` before `publish_dir`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, dir_mode())
    return Path(tmp)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a rename in directory `path` durable (file systems that cannot fsync a directory are left as they are)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def publish_file(tmp: str | Path, path: str | Path) -> None:
    """Publish the finished temporary sibling `tmp` as `path`: the umask's mode (writers such as safetensors'
    save_file recreate the file 0600), fsync, rename, fsync of the directory."""
    os.chmod(tmp, file_mode())
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """The one atomic write: a temporary sibling of `path` for the block to write (by any writer: open, savefig,
    save_file), published by `publish_file` when the block succeeds and removed when it fails. Readers see the old
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        publish_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def save_safetensors_atomic(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` through `atomic_path` (published with the umask's mode, not 0600)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def publish_dir(tmp_dir: str | Path, final_dir: str | Path) -> None:
    """Replace `final_dir` by `tmp_dir`: a reader sees the old complete directory or the new one, never a mix.

    The old directory is deleted: call this only after `claim_output(final_dir, ...)` said it may be replaced (it is
    absent, empty, or an earlier output of the same tool)."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    make_public(tmp_dir)
    old = None
    if final_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.old.", dir=final_dir.parent))
        os.rename(final_dir, old / final_dir.name)
    os.rename(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_inside(path: str | Path) -> Path | None:
    """A sign that `path` is, holds or lies inside a training run's checkpoints (the sign's path), else None."""
    path = Path(path)
    for ancestor in path.resolve().parents:
        in_checkpoints = ancestor.name == "checkpoints" and (
            (ancestor / "latest").exists() or next(ancestor.glob("iter_*"), None) is not None
        )
        if in_checkpoints or (ancestor / "complete.json").is_file():
            return ancestor
    if path.is_dir():
        for pattern in _RUN_SIGNS:
            found = next(iter(sorted(path.glob(pattern))), None)
            if found is not None:
                return found
    return None


def read_owner(proof: Path) -> dict[str, Any] | None:
    """The JSON object in an ownership file, or None when it is missing or not one."""
    try:
        data = json.loads(proof.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def claim_output(
    path: str | Path,
    *,
    overwrite: bool,
    flag: str,
    tool: str,
    proof: str | Path,
    files: Sequence[Path] | None = None,
    owned: bool | None = None,
) -> bool:
    """Decide whether `tool` may write its output at `path`; True when it replaces an earlier output of its own.

    The rule every command of ours follows, so that none deletes or overwrites what it did not write:
    1. A path that is, holds or lies inside a training run's checkpoints (a run directory, a parent of runs, a
       checkpoints directory or one checkpoint) is refused, --overwrite or not.
    2. A path that does not exist, or an empty directory, is written.
    3. An earlier output of the same tool is replaced only with --overwrite (`overwrite=True`). What proves it is
       ours: the JSON file `proof` in the directory, whose "written_by" names `tool` (absent in files older than this
       rule) and whose "files", when present, list everything else in the directory.
    4. Anything else (a file where a directory goes, a directory with files the tool did not write) is refused,
       --overwrite or not: we cannot know what would be lost.
    An output made of files rather than a directory (a shard PREFIX.bin/.idx/.json, a plot) passes them as `files`;
    `proof` is then the path of the JSON file among them, or the caller passes `owned` after its own check.
    Views recomputed from data that stays on disk (a comparison report, a routing plot, the headline results of an
    evaluation store) pass `overwrite=True` themselves: replacing an earlier view of theirs loses nothing, and rule 4
    still guards everything else.
    Raises OutputRefused (a ValueError) with one line naming `flag`, the path, why, and the fix.
    """
    path = Path(path)
    sign = run_inside(path)
    if sign is not None:
        raise OutputRefused(
            f"{flag} {path}: {sign} belongs to a training run, whose checkpoints are never replaced or written "
            f"into; choose a path outside the run that does not exist yet"
        )
    if files is not None:
        present = sorted(str(f) for f in files if f.exists() or f.is_symlink())
        if not present:
            return False
        for f in files:
            if f.is_dir():
                raise OutputRefused(f"{flag} {path}: {f} is a directory; choose another {flag}")
        what, shown = "files", ", ".join(present)
    else:
        if not path.exists():
            return False
        if not path.is_dir():
            raise OutputRefused(
                f"{flag} {path} is a file, not a directory; choose a directory path that does not exist yet"
            )
        entries = sorted(p.name for p in path.iterdir())
        if not entries:
            return False
        what, shown = "directory", ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    if owned is None:
        owner = read_owner(path / proof if files is None else Path(proof))
        # Ownership files older than this rule lack "written_by": a directory's proof has a name of ours, so its
        # presence is enough; a file group's proof (PREFIX.json) could be anyone's, so it must name the tool.
        owned = owner is not None and owner.get("written_by", tool if files is None else None) == tool
        listed = owner.get("files") if owner is not None else None
        if owned and files is None and isinstance(listed, list):
            foreign = [name for name in entries if name != Path(proof).name and name not in listed]
            if foreign:
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                raise OutputRefused(
                    f"{flag} {path} holds an earlier output of {tool} plus files it did not write ({shown}); it is "
                    f"never replaced: move those files away or choose a new path"
                )
    if not owned:
        if what == "directory":
            held = f"exists and holds files that {tool} did not write ({shown})"
        elif files == [path]:
            held = f"exists and was not written by {tool}"
        else:
            held = f"would replace {shown}, which {tool} did not write"
        raise OutputRefused(
            f"{flag} {path} {held}; it is never replaced: choose a new path"
            + (" or an empty directory" if what == "directory" else "")
        )
    if not overwrite:
        raise OutputRefused(
            f"{flag} {path} already holds an earlier output of {tool} ({shown}); pass --overwrite "
            f"to replace it, or choose a new path"
        )
    return True


def write_owner(directory: str | Path, tool: str, proof: str, extra: dict[str, Any] | None = None) -> None:
    """Write the ownership file `proof` into `directory` (being built), listing every file in it (see claim_output)."""
    directory = Path(directory)
    files = sorted(p.name for p in directory.iterdir() if p.name != proof)
    record = {"written_by": tool, **(extra or {}), "files": files}
    write_text_atomic(directory / proof, json.dumps(record, indent=2) + "\n")


@contextlib.contextmanager
def created_dirs_removed_on_error(directory: str | Path) -> Iterator[None]:
    """Create `directory` (and missing parents); if the block fails, remove those that this call created and that
    are empty again - a refused or failed command leaves the file system as it found it."""
    directory = Path(directory)
    missing = [p for p in [directory, *directory.parents] if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for created in missing:  # deepest first
            with contextlib.suppress(OSError):
                created.rmdir()
        raise


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


class LockBusy(ValueError):
    """Another live process holds the exclusive lock of an output (see `ExclusiveLock`)."""


class ExclusiveLock:
    """An exclusive, non-blocking fcntl.flock on `path`, held until `release()` or until the process dies (the kernel
    drops it then: a killed holder leaves no stale lock to clean up). Two commands writing into one place - a run
    directory, a shard prefix - would delete or mix each other's files; the second one is refused at start instead.

    The lock file holds the holder's host, PID and start time (shown to the refused command). `release()` removes the
    file and the directories that `acquire` created for it when they are empty again, so a refused or failed command
    leaves the file system as it found it; a holder that re-checks the file's inode after locking never holds a lock
    on a file that a releasing holder just unlinked.
    """

    def __init__(self, path: Path, fd: int, created_dirs: list[Path]) -> None:
        self.path = path
        self._fd: int | None = fd
        self._created_dirs = created_dirs
        # A forked child (a DataLoader worker, a datasets.map process) shares the locked file description: were it
        # to outlive a killed holder, the next run would be refused. The child closes its copy (never LOCK_UN, which
        # would unlock the parent too); exec'd children do not get it (os.open's descriptors are non-inheritable).
        os.register_at_fork(after_in_child=functools.partial(_forget_in_child, weakref.ref(self)))

    @classmethod
    def acquire(cls, path: str | Path, what: str, fix: str) -> ExclusiveLock:
        """Lock `path` or raise LockBusy: "`what` is in use by <holder> (lock file PATH); `fix`"."""
        path = Path(path)
        created = [p for p in path.parents if not p.exists()]  # deepest first
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise LockBusy(f"{what} is in use by {holder} (lock file {path}); {fix}") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released (and unlinked) it between our open and our lock: try again
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": started}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        return cls(path, fd, created)

    def release(self) -> None:
        """Unlink the lock file (while still holding it), unlock, and remove the directories created for it if
        they are empty. Idempotent."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None
        for directory in self._created_dirs:  # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()


def _forget_in_child(ref: weakref.ReferenceType[ExclusiveLock]) -> None:
    lock = ref()
    if lock is not None and lock._fd is not None:
        os.close(lock._fd)
        lock._fd = None  # release() in the child does nothing: the lock and its file are the parent's


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"host {record['host']}, PID {record['pid']}, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its host and PID yet)"


def writable_dir(path: str | Path) -> bool:
    """True when files can be created in `path` (creating it if needed)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)
