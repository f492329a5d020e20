"""Where the project keeps data it downloads or unpacks (corpora, Fashion-MNIST), the same for every package."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "PNET_DATA_DIR"


def default_data_dir() -> Path:
    """$PNET_DATA_DIR; else `<repo>/data` (git-ignored) when running from a checkout; else, for an installed package,
    whose directory (site-packages) is no place for data, `$XDG_CACHE_HOME/parameternet/data` (~/.cache/...)."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():  # a checkout (editable install or PYTHONPATH)
        return root / "data"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "parameternet" / "data"
