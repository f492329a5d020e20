"""Field checks every trainer shares: float ranges, the seed range, the LR floor, resume values, writable
directories."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

MAX_SEED = 2**32 - 1  # numpy's and most tools' seed range


class FloatRange(NamedTuple):
    """A float field's valid interval and the fix shown with a value outside it."""

    low: float
    low_inclusive: bool
    high: float
    high_inclusive: bool
    fix: str

    def contains(self, value: float) -> bool:
        above = value >= self.low if self.low_inclusive else value > self.low
        below = value <= self.high if self.high_inclusive else value < self.high
        return above and below  # False for nan: every comparison with nan is false

    def shown(self) -> str:
        return f"{'[' if self.low_inclusive else '('}{self.low:g}, {self.high:g}{']' if self.high_inclusive else ')'}"


def check_min_lr(lr: float, min_lr: float) -> None:
    """The floor of the LR decay lies between 0 and the peak."""
    if not (math.isfinite(min_lr) and 0 <= min_lr <= lr):
        raise ValueError(
            f"min_lr={min_lr} must lie in [0, lr={lr}]; the floor of the decay, e.g. lr / 10 = {lr / 10:g}"
        )


def check_resume(value: str) -> None:
    if value not in ("none", "auto") and not Path(value).is_dir():
        raise ValueError(
            f"resume={value!r}: not 'none', 'auto' or an existing checkpoint directory; "
            f"use --resume auto to continue the newest checkpoint in output_dir"
        )


def check_directory_path(name: str, value: str) -> None:
    """A directory the run creates or writes in: refuse what would fail later with a traceback (or write elsewhere)."""
    if not value.strip():
        raise ValueError(f"{name}={value!r} is empty; give a directory path, e.g. --{name} runs/my_run")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"{name}={value!r} is an existing file, not a directory; choose a directory path (a new "
            f"one, or the run's own directory)"
        )
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(
            f"{name}={value!r}: {str(parent)!r} on its path is a file, not a directory; choose another path"
        )
    if not os.access(parent if not path.exists() else path, os.W_OK | os.X_OK):
        raise ValueError(
            f"{name}={value!r}: no permission to write in {str(parent if not path.exists() else path)!r}"
            f"; choose a writable location"
        )
