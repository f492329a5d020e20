"""The sample index of one split of one shard: which tokens each packed sample holds, built once and cached on disk.

How a split's samples are made:
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

The index arrays are cached as .npy files next to the shards (`<shard dir>/index_cache/`, or a user cache dir when
that is read-only), keyed by the parameters and checked against a fingerprint of the shard: a rebuilt shard gets
rebuilt indices. Ranks that build the same index at once take a file lock; the JSON written last marks it complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm.data.data_path import SPLIT_NAMES
from llm.data.indexed_dataset import IndexedDataset
from runtime.fsutil import atomic_path, file_lock, writable_dir
from runtime.sharedfs import wait_for_file

INDEX_CACHE_VERSION = 1
CACHE_ENV = "PNET_INDEX_CACHE"


# ----------------------------------------------------------------------------------------------------------------
# index arrays


def _epoch_rng(seed: int, split_index: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, split_index, epoch, stream])


def expand_documents(document_indices: np.ndarray, documents: np.ndarray) -> np.ndarray:
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
    sequences = expand_documents(document_indices, documents)
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


# ----------------------------------------------------------------------------------------------------------------
# where the cache lives, and its files


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
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def write_json(path: Path, data: dict) -> None:
    """Publish a small JSON file by rename (readers never see half of it)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# the cache of one split


@dataclass(frozen=True)
class SampleIndex:
    """Where each sample starts: `sequences` lists sequence ids epoch after epoch (in each epoch's document order),
    `samples[j]` is (position in `sequences`, token offset in that sequence) of sample j's first token, and dataset
    index i reads sample `order[i]`."""

    sequences: np.ndarray
    samples: np.ndarray
    order: np.ndarray


@dataclass(frozen=True)
class IndexCache:
    """The cached sample index of one split of one shard: what keys it, where it lives, how it is built."""

    indexed: IndexedDataset
    split_name: str
    document_range: tuple[int, int]
    seq_len: int
    seed: int
    cache_dir: Path
    fingerprint: str

    def description(self) -> dict:
        return {
            "class": "GPTDataset",  # the key of caches written before this module existed: keep them valid
            "version": INDEX_CACHE_VERSION,
            "shard": Path(self.indexed.prefix).name,
            "split": self.split_name,
            "document_range": list(self.document_range),
            "seq_len": self.seq_len,
            "seed": self.seed,
        }

    def stem(self) -> Path:
        key = hashlib.blake2b(json.dumps(self.description(), sort_keys=True).encode(), digest_size=8).hexdigest()
        return self.cache_dir / f"{Path(self.indexed.prefix).name}.{self.split_name}.{key}"

    def load_or_build(self, num_epochs: int, samples_per_epoch: int, tokens_per_epoch: int) -> SampleIndex:
        """The index of at least `num_epochs` epochs, from the cache or built now (once, under a lock)."""
        index = self.load(num_epochs, samples_per_epoch)
        if index is not None:
            return index
        stem = self.stem()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(f"{stem}.lock"):
            index = self.load(num_epochs, samples_per_epoch)  # another rank may have built it while we waited
            if index is None:
                self._build(num_epochs, samples_per_epoch, tokens_per_epoch)
                index = self.load(num_epochs, samples_per_epoch)
                if index is None:
                    raise RuntimeError(f"index cache {stem}.* could not be read back after building it")
        return index

    def load(self, num_epochs: int, samples_per_epoch: int) -> SampleIndex | None:
        """The cached index (memory-mapped), or None when it is missing, stale or shorter than `num_epochs`."""
        stem = self.stem()
        try:
            meta = json.loads(Path(f"{stem}.json").read_text())
        except (OSError, ValueError):
            return None
        expected = self.description() | {"fingerprint": self.fingerprint}
        if any(meta.get(k) != v for k, v in expected.items()) or meta.get("num_epochs", 0) < num_epochs:
            return None  # stale (shard rewritten) or too short for this request: rebuild
        names = ("sequences", "samples", "order")
        # The JSON is written after the arrays: beside it they exist, if perhaps not yet on this node (a shared file
        # system shows another node's files late). Waited for, bounded; the timeout names the file.
        for name in names:
            wait_for_file(f"{stem}.{name}.npy", writer="the rank that built the index")
        try:
            arrays = {name: np.load(f"{stem}.{name}.npy", mmap_mode="r") for name in names}
        except (OSError, ValueError):
            return None
        epochs, per_epoch = meta["num_epochs"], meta["samples_per_epoch"]
        if per_epoch != samples_per_epoch or arrays["order"].shape != (epochs * per_epoch,):
            return None
        return SampleIndex(arrays["sequences"], arrays["samples"], arrays["order"])

    def _build(self, num_epochs: int, samples_per_epoch: int, tokens_per_epoch: int) -> None:
        # Build whole epochs, at least as many as needed and never fewer than a cache already holds.
        split_index = SPLIT_NAMES.index(self.split_name)
        sequences, samples, orders = [], [], []
        sequence_base = sample_base = 0
        for epoch in range(num_epochs):
            seq, pos, off, order = build_epoch(
                self.indexed.sizes,
                self.indexed.document_indices,
                self.document_range,
                self.seq_len,
                self.seed,
                split_index,
                epoch,
            )
            sequences.append(seq)
            samples.append(np.stack([pos + sequence_base, off], axis=1))
            orders.append(order + sample_base)
            sequence_base += seq.size
            sample_base += order.size
        all_sequences = np.concatenate(sequences)
        all_samples = np.concatenate(samples)
        all_orders = np.concatenate(orders)
        stem = self.stem()
        _save_npy(Path(f"{stem}.sequences.npy"), all_sequences.astype(_smallest_int(len(self.indexed))))
        sample_max = max(int(all_samples.max(initial=0)), 0)
        _save_npy(Path(f"{stem}.samples.npy"), all_samples.astype(_smallest_int(sample_max)))
        _save_npy(Path(f"{stem}.order.npy"), all_orders.astype(_smallest_int(all_orders.size)))
        # The JSON goes last: its presence says the arrays next to it are complete.
        write_json(
            Path(f"{stem}.json"),
            self.description()
            | {
                "fingerprint": self.fingerprint,
                "num_epochs": num_epochs,
                "samples_per_epoch": samples_per_epoch,
                "tokens_per_epoch": tokens_per_epoch,
            },
        )
