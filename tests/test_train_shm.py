"""runtime.shm: stale DeepSpeed shm segments are removed only when no process maps them and they are old."""

from __future__ import annotations

import mmap
import os
import re
import time
from pathlib import Path

import pytest

from runtime.shm import PREFIX, SHM_DIR, remove_stale_segments, segment_path

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")


def _segment(tag: str, age_s: float) -> os.PathLike:
    path = SHM_DIR / f"{PREFIX}{os.getuid()}_127.0.0.1_test{os.getpid()}{tag}_0"
    path.write_bytes(b"\0" * mmap.PAGESIZE)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_only_old_unmapped_segments_are_removed():
    stale, fresh, mapped = _segment("stale", 3600), _segment("fresh", 0), _segment("mapped", 3600)
    with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), mmap.PAGESIZE):
        try:
            removed = remove_stale_segments(min_age_s=60)
            assert stale in removed and not stale.exists()
            assert fresh.exists() and mapped.exists()  # a run starting up, a run in progress
        finally:
            for path in (stale, fresh, mapped):
                path.unlink(missing_ok=True)


def test_segment_path_follows_the_installed_deepspeeds_naming(monkeypatch):
    """The name is DeepSpeed's, read from the shm.cpp it JIT-compiles: an upgrade that renames it fails here."""
    import deepspeed

    source = (Path(deepspeed.__file__).parent / "ops" / "csrc" / "cpu" / "comm" / "shm.cpp").read_text()
    prefix = re.search(r'#define SHM_BUFFER_NAME "([^"]+)"', source).group(1)
    # name = SHM_BUFFER_NAME _ uid _ MASTER_ADDR _ MASTER_PORT, then _ rank
    assert re.search(r'"%s_%d_%s_%s",\s*SHM_BUFFER_NAME,\s*getuid\(\),\s*addr_string,\s*port_string\)', source)
    assert re.search(r'"%s_%d",\s*shm_name_prefix,\s*rank\)', source)
    assert PREFIX == f"{prefix}_"
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29501")
    assert segment_path(3).name == f"{prefix}_{os.getuid()}_10.0.0.1_29501_3"
