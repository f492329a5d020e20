"""Packed causal-LM samples over token shards: split, shuffle, blend, cache - deterministic and resumable.

How a split's samples are made (one `GPTDataset`):
- The split is a contiguous range of documents of the shard (`"969,30,1"` -> the first 96.9% of documents train ...).
- Epoch e orders the split's documents by a permutation drawn from (seed, split, e), concatenates their tokens, and
  cuts the stream into `S = (T - 1) // seq_len` samples of `seq_len + 1` tokens with stride `seq_len`: sample j is
  tokens [j*seq_len, (j+1)*seq_len], so every token is an input exactly once per epoch and a sample's last token is the
  next sample's first (it is only a target there). The < seq_len tokens after the last whole sample are left out of
  that epoch; the next epoch's different document order leaves out different ones.
- The S samples of epoch e are then visited in a second permutation drawn from (seed, split, e).
- Dataset index i is sample `i mod S` of epoch `i // S` (after that shuffle). Nothing depends on the number of
  samples requested, so asking for more (a longer run) only appends; sample i is the same in every run with the same
  seed and shards - which is what makes "resume at consumed sample k" exact.
- The index arrays are cached as .npy files next to the shards (`<shard dir>/index_cache/`, or a user cache dir when
  that is read-only), keyed by the parameters and checked against a fingerprint of the shard: a rebuilt shard gets
  rebuilt indices.

Blending (`BlendedDataset`): sample i comes from source d where d is the i-th smallest "due time" (k + 1/2) / w_d over
all sources d and their k-th samples: after any n samples each source has contributed within one sample of w_d * n
(plus half the number of sources), deterministically and again independent of the total requested.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from runtime.fsutil import file_lock, temp_path_for, writable_dir
from llm.data.indexed_dataset import IndexedDataset, split_prefix

SPLIT_NAMES = ("train", "valid", "test")
INDEX_CACHE_VERSION = 1
CACHE_ENV = "PNET_INDEX_CACHE"


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


# ----------------------------------------------------------------------------------------------------------------
# index arrays


def _epoch_rng(seed: int, split_index: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, split_index, epoch, stream])


def _expand_documents(document_indices: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """Sequence ids of `documents`, in that document order (a document may hold several sequences)."""
    starts = document_indices[documents]
    counts = document_indices[documents + 1] - starts
    total = int(counts.sum())
    offsets = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(offsets - starts, counts)


def build_epoch(
    sizes: np.ndarray,
    document_indices: np.ndarray,
    document_range: tuple[int, int],
    seq_len: int,
    seed: int,
    split_index: int,
    epoch: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One epoch: (sequence order, sample start position in that order, start offset, sample visiting order)."""
    start, end = document_range
    documents = start + _epoch_rng(seed, split_index, epoch, 0).permutation(end - start)
    sequences = _expand_documents(document_indices, documents)
    lengths = sizes[sequences].astype(np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if ends.size else 0
    num_samples = (total - 1) // seq_len
    sample_starts = np.arange(num_samples, dtype=np.int64) * seq_len
    # side="right": the first sequence whose end lies beyond the start - skips empty sequences.
    positions = np.searchsorted(ends, sample_starts, side="right")
    offsets = sample_starts - (ends[positions] - lengths[positions])
    order = _epoch_rng(seed, split_index, epoch, 1).permutation(num_samples)
    return sequences, positions, offsets, order


def _smallest_int(max_value: int) -> type[np.integer]:
    return np.int32 if max_value < np.iinfo(np.int32).max else np.int64


def shard_fingerprint(indexed: IndexedDataset) -> str:
    """Hash of the .idx bytes plus the .bin size: changes whenever the shard is rewritten with other content."""
    digest = hashlib.blake2b(digest_size=16)
    with open(indexed.index_file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    digest.update(str(indexed.data_file.stat().st_size).encode())
    return digest.hexdigest()


def resolve_cache_dir(prefix: str, cache_dir: str | Path | None = None) -> Path:
    """`cache_dir` if given; else `<shard dir>/index_cache`; else (read-only shards) a per-shard user cache dir."""
    if cache_dir is not None:
        return Path(cache_dir)
    beside = Path(prefix).parent / "index_cache"
    if writable_dir(beside):
        return beside
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "parameternet" / "index_cache"))
    tag = hashlib.blake2b(str(Path(prefix).resolve()).encode(), digest_size=8).hexdigest()
    return root / f"{Path(prefix).name}-{tag}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = temp_path_for(path)
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    tmp.replace(path)


def _write_json(path: Path, data: dict) -> None:
    tmp = temp_path_for(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


class GPTDataset(torch.utils.data.Dataset):
    """`num_samples` packed samples of `seq_len + 1` tokens (int64) from one split of one shard."""

    def __init__(
        self,
        indexed: IndexedDataset,
        split_name: str,
        document_range: tuple[int, int],
        seq_len: int,
        seed: int,
        num_samples: int | None,
        *,
        cache_dir: str | Path | None = None,
        fingerprint: str | None = None,
    ) -> None:
        if split_name not in SPLIT_NAMES:
            raise ValueError(f"split_name={split_name!r}; use one of {SPLIT_NAMES}")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len}; it must be >= 1")
        if seed < 0:
            raise ValueError(f"seed={seed}; it must be >= 0")
        self.indexed = indexed
        self.split_name = split_name
        self.split_index = SPLIT_NAMES.index(split_name)
        self.document_range = (int(document_range[0]), int(document_range[1]))
        self.seq_len = seq_len
        self.seed = seed
        start, end = self.document_range
        if not 0 <= start < end <= indexed.num_documents:
            raise ValueError(f"{split_name} split of {indexed.prefix} has documents [{start}, {end}) of "
                             f"{indexed.num_documents}: no documents; change the split")
        sequences = _expand_documents(indexed.document_indices, np.arange(start, end))
        self.tokens_per_epoch = int(indexed.sizes[sequences].astype(np.int64).sum())
        self.samples_per_epoch = (self.tokens_per_epoch - 1) // seq_len
        if self.samples_per_epoch < 1:
            raise ValueError(
                f"the {split_name} split of {indexed.prefix} holds {self.tokens_per_epoch} tokens, fewer than one "
                f"sample of seq_len + 1 = {seq_len + 1}; lower seq_len, give this split more documents, or use a "
                f"bigger corpus"
            )
        if num_samples is None:
            num_samples = self.samples_per_epoch
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} for the {split_name} split; it must be >= 1")
        self.num_samples = int(num_samples)
        self.num_epochs = -(-self.num_samples // self.samples_per_epoch)
        self.cache_dir = resolve_cache_dir(indexed.prefix, cache_dir)
        self._fingerprint = fingerprint or shard_fingerprint(indexed)
        self._load_or_build()

    # -- cache -------------------------------------------------------------------------------------------------
    def _description(self) -> dict:
        return {
            "class": "GPTDataset",
            "version": INDEX_CACHE_VERSION,
            "shard": Path(self.indexed.prefix).name,
            "split": self.split_name,
            "document_range": list(self.document_range),
            "seq_len": self.seq_len,
            "seed": self.seed,
        }

    def _cache_stem(self) -> Path:
        key = hashlib.blake2b(json.dumps(self._description(), sort_keys=True).encode(), digest_size=8).hexdigest()
        return self.cache_dir / f"{Path(self.indexed.prefix).name}.{self.split_name}.{key}"

    def _load_or_build(self) -> None:
        stem = self._cache_stem()
        if not self._try_load(stem):
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with file_lock(f"{stem}.lock"):
                if not self._try_load(stem):  # another rank may have built it while we waited
                    self._build(stem)
                    if not self._try_load(stem):
                        raise RuntimeError(f"index cache {stem}.* could not be read back after building it")

    def _try_load(self, stem: Path) -> bool:
        meta_path = Path(f"{stem}.json")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return False
        expected = self._description() | {"fingerprint": self._fingerprint}
        if any(meta.get(k) != v for k, v in expected.items()) or meta.get("num_epochs", 0) < self.num_epochs:
            return False  # stale (shard rewritten) or too short for this request: rebuild
        try:
            arrays = {name: np.load(f"{stem}.{name}.npy", mmap_mode="r") for name in ("sequences", "samples", "order")}
        except (OSError, ValueError):
            return False
        epochs, per_epoch = meta["num_epochs"], meta["samples_per_epoch"]
        if per_epoch != self.samples_per_epoch or arrays["order"].shape != (epochs * per_epoch,):
            return False
        self._sequences = arrays["sequences"]
        self._samples = arrays["samples"]
        self._order = arrays["order"]
        return True

    def _build(self, stem: Path) -> None:
        # Build whole epochs, at least as many as needed and never fewer than a cache already holds.
        sequences, samples, orders = [], [], []
        sequence_base = sample_base = 0
        for epoch in range(self.num_epochs):
            seq, pos, off, order = build_epoch(
                self.indexed.sizes, self.indexed.document_indices, self.document_range, self.seq_len,
                self.seed, self.split_index, epoch,
            )
            sequences.append(seq)
            samples.append(np.stack([pos + sequence_base, off], axis=1))
            orders.append(order + sample_base)
            sequence_base += seq.size
            sample_base += order.size
        all_sequences = np.concatenate(sequences)
        all_samples = np.concatenate(samples)
        all_orders = np.concatenate(orders)
        _save_npy(Path(f"{stem}.sequences.npy"), all_sequences.astype(_smallest_int(len(self.indexed))))
        sample_max = max(int(all_samples.max(initial=0)), 0)
        _save_npy(Path(f"{stem}.samples.npy"), all_samples.astype(_smallest_int(sample_max)))
        _save_npy(Path(f"{stem}.order.npy"), all_orders.astype(_smallest_int(all_orders.size)))
        # The JSON goes last: its presence says the arrays next to it are complete.
        _write_json(
            Path(f"{stem}.json"),
            self._description()
            | {
                "fingerprint": self._fingerprint,
                "num_epochs": self.num_epochs,
                "samples_per_epoch": self.samples_per_epoch,
                "tokens_per_epoch": self.tokens_per_epoch,
            },
        )

    # Pickled without the index arrays (they can be large): the copy memory-maps the same cache files again.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_sequences", "_samples", "_order")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if not self._try_load(self._cache_stem()):
            raise FileNotFoundError(f"index cache {self._cache_stem()}.* vanished or changed since this dataset "
                                    f"was built; build the datasets again")

    # -- access ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_samples

    def epoch_of(self, index: int) -> int:
        return index // self.samples_per_epoch

    def __getitem__(self, index: int) -> np.ndarray:
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} {self.split_name} samples")
        position, offset = (int(v) for v in self._samples[int(self._order[index])])
        needed = self.seq_len + 1
        parts = []
        while needed > 0:
            sequence = int(self._sequences[position])
            take = min(int(self.indexed.sizes[sequence]) - offset, needed)
            parts.append(self.indexed.get(sequence, offset, take))
            needed -= take
            position += 1
            offset = 0
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# blending


def blend_indices(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of sample i, index of that sample within its source) for i < num_samples; see the module docstring."""
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    num_sources = weights.size
    times, sources, ranks = [], [], []
    for source, weight in enumerate(weights):
        if weight <= 0:
            continue
        # Enough candidates that the num_samples earliest due times are all among them (bound in the docstring).
        count = int(math.ceil(weight * num_samples + num_sources / 2)) + 1
        k = np.arange(count, dtype=np.int64)
        times.append((k + 0.5) / weight)
        sources.append(np.full(count, source, dtype=np.int64))
        ranks.append(k)
    times_all, sources_all, ranks_all = np.concatenate(times), np.concatenate(sources), np.concatenate(ranks)
    order = np.lexsort((sources_all, times_all))[:num_samples]  # ties go to the lower source index
    dtype = np.uint8 if num_sources < 256 else np.int32
    return sources_all[order].astype(dtype), ranks_all[order]


class BlendedDataset(torch.utils.data.Dataset):
    """Interleaves several datasets by weight (see `blend_indices`)."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset | None], weights: Sequence[float],
                 num_samples: int) -> None:
        self.datasets = list(datasets)
        self.weights = list(weights)
        self.dataset_index, self.dataset_sample_index = blend_indices(weights, num_samples)
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for source, (dataset, needed) in enumerate(zip(self.datasets, counts)):
            if needed and (dataset is None or len(dataset) < needed):
                raise ValueError(f"blend source {source} supplies {0 if dataset is None else len(dataset)} samples "
                                 f"but the blend needs {needed}")

    def __len__(self) -> int:
        return int(self.dataset_index.size)

    def __getitem__(self, index: int) -> np.ndarray:
        if index < 0:
            index += len(self)
        source = int(self.dataset_index[index])
        return self.datasets[source][int(self.dataset_sample_index[index])]


# ----------------------------------------------------------------------------------------------------------------
# entry point


def _check_vocab(indexed: IndexedDataset, vocab_size: int, cache_dir: Path, fingerprint: str) -> None:
    """Refuse shards holding ids >= vocab_size (the embedding lookup would fail deep inside the model)."""
    if np.iinfo(indexed.dtype).max < vocab_size:
        return  # the dtype cannot even hold an out-of-range id
    stats_path = cache_dir / f"{Path(indexed.prefix).name}.stats.json"
    max_id = None
    try:
        stats = json.loads(stats_path.read_text())
        if stats.get("fingerprint") == fingerprint:
            max_id = int(stats["max_token_id"])
    except (OSError, ValueError, KeyError):
        pass
    if max_id is None:
        max_id = indexed.max_token_id()  # one scan per shard version; cached
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_json(stats_path, {"fingerprint": fingerprint, "max_token_id": max_id})
    if max_id >= vocab_size:
        raise ValueError(
            f"shard {indexed.prefix} holds token id {max_id}, but the model's vocab_size is {vocab_size}: it was "
            f"tokenized with a different (larger) tokenizer. Re-run `python -m llm.data.prepare` with the model's "
            f"tokenizer, or use a model config whose vocab_size exceeds {max_id}"
        )


def build_datasets(
    prefixes: Sequence[str] | str,
    weights: Sequence[float] | None,
    split: str,
    seq_len: int,
    seed: int,
    num_samples: Sequence[int | None],
    *,
    vocab_size: int | None = None,
    max_position_embeddings: int | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[torch.utils.data.Dataset | None, torch.utils.data.Dataset | None, torch.utils.data.Dataset | None]:
    """(train, valid, test) datasets over shard `prefixes` blended by `weights`.

    `num_samples[i]` samples for split i: 0 -> that dataset is None; None -> one epoch (for a blend: the largest
    number of samples in which no source repeats). `weights=None` weights sources by their token counts.
    `vocab_size` (the model's) refuses shards with larger ids; `max_position_embeddings` refuses a longer seq_len.
    """
    if isinstance(prefixes, (str, Path)):
        prefixes = [str(prefixes)]
    prefixes = [split_prefix(p) for p in prefixes]
    if not prefixes:
        raise ValueError("no data prefixes given; pass at least one shard prefix (PREFIX for PREFIX.bin/.idx)")
    norm_weights = normalize_weights(weights, prefixes)
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}; it must be a positive integer")
    if max_position_embeddings is not None and seq_len > max_position_embeddings:
        raise ValueError(
            f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_position_embeddings}; lower "
            f"seq_len or use a model config with more positions"
        )
    if len(num_samples) != 3:
        raise ValueError(f"num_samples={tuple(num_samples)} must give (train, valid, test) sample counts")
    if any(n is not None and n < 0 for n in num_samples):
        raise ValueError(f"num_samples={tuple(num_samples)} must be >= 0 (or None for one epoch)")

    shards = [IndexedDataset(p) for p in prefixes]
    fingerprints = [shard_fingerprint(s) for s in shards]
    cache_dirs = [resolve_cache_dir(p, cache_dir) for p in prefixes]
    if vocab_size is not None:
        for shard, directory, fingerprint in zip(shards, cache_dirs, fingerprints):
            _check_vocab(shard, vocab_size, directory, fingerprint)
    ranges = [split_ranges(s.num_documents, split) for s in shards]

    results: list[torch.utils.data.Dataset | None] = []
    for split_index, split_name in enumerate(SPLIT_NAMES):
        wanted = num_samples[split_index]
        if wanted == 0:
            results.append(None)
            continue

        def make(source: int, count: int | None) -> GPTDataset:
            return GPTDataset(shards[source], split_name, ranges[source][split_index], seq_len, seed, count,
                              cache_dir=cache_dirs[source], fingerprint=fingerprints[source])

        has_docs = [r[split_index][1] > r[split_index][0] for r in ranges]
        if len(shards) == 1:
            if not has_docs[0]:
                results.append(None)  # e.g. a '100,0,0' split has no valid/test documents
                continue
            results.append(make(0, wanted))
            continue

        if norm_weights is None:
            token_counts = [
                int(s.sizes[_expand_documents(s.document_indices, np.arange(*r[split_index]))].sum()) for s, r in
                zip(shards, ranges)
            ]
            split_weights = [c / max(sum(token_counts), 1) for c in token_counts]
        else:
            split_weights = list(norm_weights)
        missing = [prefixes[i] for i, w in enumerate(split_weights) if w > 0 and not has_docs[i]]
        if missing:
            raise ValueError(f"the {split_name} split is empty in {missing} although their blend weight is positive; "
                             f"change the split or the weights")
        if sum(split_weights) <= 0:
            results.append(None)
            continue
        if wanted is None:
            per_epoch = [make(i, None).samples_per_epoch if w > 0 else 0 for i, w in enumerate(split_weights)]
            wanted = int(min(p / w for p, w in zip(per_epoch, split_weights) if w > 0))
        sources, _ = blend_indices(split_weights, wanted)
        counts = np.bincount(sources, minlength=len(shards))
        parts = [make(i, int(c)) if c > 0 else None for i, c in enumerate(counts)]
        results.append(BlendedDataset(parts, split_weights, wanted))
    return results[0], results[1], results[2]
