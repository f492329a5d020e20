"""What the user writes to name the data: Megatron's `--data-path`, blend weights, and the train/valid/test split.

Pure parsing and arithmetic, no file access: the config checks these values up front (llm/train/config.py) and the
datasets use them to cut each shard (gpt_dataset.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from llm.data.indexed_dataset import split_prefix

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str | Sequence[float]) -> tuple[float, float, float]:
    """'969,30,1' -> normalized (train, valid, test) fractions; missing parts are 0 ('98,2' -> valid 2%)."""
    if isinstance(split, str):
        parts = [p.strip() for p in split.replace("/", ",").split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"split={split!r} is not a list of numbers; write e.g. '969,30,1'") from None
    else:
        values = [float(v) for v in split]
    if not 1 <= len(values) <= 3:
        raise ValueError(f"split={split!r} must have 1 to 3 parts (train,valid,test), e.g. '969,30,1'")
    if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"split={split!r} must hold non-negative numbers with a positive sum, e.g. '969,30,1'")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return (values[0] / total, values[1] / total, values[2] / total)


def split_ranges(num_documents: int, split: str | Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous document ranges [start, end) of train/valid/test (boundaries rounded, the last at the end)."""
    fractions = parse_split(split)
    bounds = [0]
    cumulative = 0.0
    for fraction in fractions:
        cumulative += fraction
        bounds.append(min(num_documents, int(round(cumulative * num_documents))))
    bounds[-1] = num_documents
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def parse_data_path(spec: str | Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's `--data-path` syntax: 'PREFIX' or 'W1 PREFIX1 W2 PREFIX2 ...' -> (prefixes, weights or None)."""
    tokens = spec.split() if isinstance(spec, str) else [str(t) for t in spec]
    if not tokens:
        raise ValueError("data path is empty; pass PREFIX or 'W1 PREFIX1 W2 PREFIX2 ...'")

    def is_number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    if not any(is_number(t) for t in tokens):
        return [split_prefix(t) for t in tokens], None
    if len(tokens) % 2 or not all(is_number(t) for t in tokens[0::2]):
        raise ValueError(f"data path {' '.join(tokens)!r} must alternate weights and prefixes: 'W1 PREFIX1 W2 PREFIX2'")
    return [split_prefix(t) for t in tokens[1::2]], [float(t) for t in tokens[0::2]]


def normalize_weights(weights: Sequence[float] | None, prefixes: Sequence[str]) -> list[float] | None:
    """Blend weights, one per prefix, scaled to sum to 1; None stays None (weight by size)."""
    if weights is None:
        return None
    weights = [float(w) for w in weights]
    if len(weights) != len(prefixes):
        raise ValueError(
            f"{len(weights)} blend weights {weights} for {len(prefixes)} prefixes {list(prefixes)}; give one weight "
            f"per prefix (or none to weight by size)"
        )
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"blend weights must be finite and >= 0; got {weights}")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"blend weights {weights} sum to 0; at least one prefix needs a positive weight")
    return [w / total for w in weights]
