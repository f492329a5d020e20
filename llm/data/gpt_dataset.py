"""Packed causal-LM samples over token shards: the dataset of one split, and (train, valid, test) from data paths.

`GPTDataset` serves `num_samples` samples of `seq_len + 1` tokens from one split of one shard, read through its sample
index (how samples are cut, shuffled by epoch and cached: index_cache.py). `build_datasets` is the entry point: it
checks the inputs against the model, cuts each shard into splits (data_path.py) and blends several shards by weight
(blend.py). Everything is deterministic and resumable: sample i is a function of the seed and the shards only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from llm.data.blend import BlendedDataset, blend_indices
from llm.data.data_path import SPLIT_NAMES, normalize_weights, split_ranges
from llm.data.index_cache import IndexCache, expand_documents, resolve_cache_dir, shard_fingerprint, write_json
from llm.data.indexed_dataset import IndexedDataset, split_prefix


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
            raise ValueError(
                f"{split_name} split of {indexed.prefix} has documents [{start}, {end}) of "
                f"{indexed.num_documents}: no documents; change the split"
            )
        sequences = expand_documents(indexed.document_indices, np.arange(start, end))
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
        self._cache = IndexCache(
            indexed,
            split_name,
            self.document_range,
            seq_len,
            seed,
            self.cache_dir,
            fingerprint or shard_fingerprint(indexed),
        )
        self._index = self._cache.load_or_build(self.num_epochs, self.samples_per_epoch, self.tokens_per_epoch)

    # Pickled without the index arrays (they can be large): the copy memory-maps the same cache files again.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_index"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        index = self._cache.load(self.num_epochs, self.samples_per_epoch)
        if index is None:
            raise FileNotFoundError(
                f"index cache {self._cache.stem()}.* vanished or changed since this dataset "
                f"was built; build the datasets again"
            )
        self._index = index

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
        position, offset = (int(v) for v in self._index.samples[int(self._index.order[index])])
        needed = self.seq_len + 1
        parts = []
        while needed > 0:
            sequence = int(self._index.sequences[position])
            take = min(int(self.indexed.sizes[sequence]) - offset, needed)
            parts.append(self.indexed.get(sequence, offset, take))
            needed -= take
            position += 1
            offset = 0
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)


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
        write_json(stats_path, {"fingerprint": fingerprint, "max_token_id": max_id})
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
            return GPTDataset(
                shards[source],
                split_name,
                ranges[source][split_index],
                seq_len,
                seed,
                count,
                cache_dir=cache_dirs[source],
                fingerprint=fingerprints[source],
            )

        has_docs = [r[split_index][1] > r[split_index][0] for r in ranges]
        if len(shards) == 1:
            if not has_docs[0]:
                results.append(None)  # e.g. a '100,0,0' split has no valid/test documents
                continue
            results.append(make(0, wanted))
            continue

        if norm_weights is None:
            token_counts = [
                int(s.sizes[expand_documents(s.document_indices, np.arange(*r[split_index]))].sum())
                for s, r in zip(shards, ranges)
            ]
            split_weights = [c / max(sum(token_counts), 1) for c in token_counts]
        else:
            split_weights = list(norm_weights)
        missing = [prefixes[i] for i, w in enumerate(split_weights) if w > 0 and not has_docs[i]]
        if missing:
            raise ValueError(
                f"the {split_name} split is empty in {missing} although their blend weight is positive; "
                f"change the split or the weights"
            )
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
