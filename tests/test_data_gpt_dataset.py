"""Packed samples, splits, epochs, blending, determinism/resume, index caches and input checks."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import llm.data.index_cache as index_cache
from llm.data.blend import BlendedDataset, blend_indices
from llm.data.data_path import parse_data_path, parse_split, split_ranges
from llm.data.gpt_dataset import GPTDataset, build_datasets
from llm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from llm.data.sampler import PretrainingSampler


def write_unique_shard(prefix: Path, lengths: list[int], base: int = 0) -> list[np.ndarray]:
    """Documents whose tokens are all distinct (base + running counter), so every token can be traced."""
    docs, start = [], base
    with IndexedDatasetBuilder(prefix, dtype=np.int32) as builder:
        for length in lengths:
            doc = np.arange(start, start + length, dtype=np.int32)
            builder.add_document(doc)
            docs.append(doc)
            start += length
    return docs


def random_lengths(seed: int, count: int, low: int = 1, high: int = 90) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(low, high, size=count)]


@pytest.fixture()
def shard(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    prefix = tmp_path / "data" / "uniq"
    return prefix, write_unique_shard(prefix, random_lengths(0, 200))


def test_split_parsing() -> None:
    assert parse_split("969,30,1") == pytest.approx((0.969, 0.030, 0.001))
    assert parse_split("98,2") == pytest.approx((0.98, 0.02, 0.0))
    assert split_ranges(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(42, "90,5,5") == [(0, 38), (38, 40), (40, 42)]
    assert split_ranges(10, "100,0,0") == [(0, 10), (10, 10), (10, 10)]
    for bad in ("a,b", "1,2,3,4", "-1,2,0", "0,0,0", ""):
        with pytest.raises(ValueError, match="split="):
            parse_split(bad)


def test_parse_data_path() -> None:
    assert parse_data_path("a/b") == (["a/b"], None)
    assert parse_data_path("0.3 x.bin 0.7 y") == (["x", "y"], [0.3, 0.7])
    with pytest.raises(ValueError, match="alternate weights and prefixes"):
        parse_data_path("0.3 x 0.7")


def test_every_token_once_per_epoch_across_document_boundaries(shard) -> None:
    prefix, docs = shard
    seq_len = 16
    ranges = split_ranges(len(docs), "80,10,10")
    split_tokens = np.concatenate(docs[ranges[0][0] : ranges[0][1]])
    train, valid, test = build_datasets([str(prefix)], None, "80,10,10", seq_len, 7, (None, None, None))
    per_epoch = train.samples_per_epoch
    assert per_epoch == (split_tokens.size - 1) // seq_len and len(train) == per_epoch
    samples = [train[i] for i in range(per_epoch)]
    assert all(s.shape == (seq_len + 1,) and s.dtype == np.int64 for s in samples)
    inputs = np.concatenate([s[:-1] for s in samples])
    assert np.unique(inputs).size == inputs.size  # no token is an input twice in one epoch
    assert set(inputs.tolist()) <= set(split_tokens.tolist())
    assert split_tokens.size - inputs.size < seq_len + 1  # only the < seq_len tail (+ the last target) is unused
    # Samples chain: each sample's last token is the next sample's first, so together they form one stream.
    firsts = {int(s[0]): i for i, s in enumerate(samples)}
    successors = [firsts.get(int(s[-1])) for s in samples]
    assert sum(x is None for x in successors) == 1 and len(set(successors) - {None}) == per_epoch - 1
    # Packing runs across document boundaries: some samples hold pieces of several documents.
    doc_of_token = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    assert max(len(set(doc_of_token[s].tolist())) for s in samples) > 1
    # Valid and test are built from their own documents only.
    for dataset, (start, end) in ((valid, ranges[1]), (test, ranges[2])):
        allowed = set(np.concatenate(docs[start:end]).tolist())
        assert all(set(dataset[i].tolist()) <= allowed for i in range(len(dataset)))


def test_exact_cover_when_tokens_divide(tmp_path: Path) -> None:
    seq_len = 8
    lengths = [5, 11, 3, 7, 9, 6]  # 41 tokens = 5 * 8 + 1
    docs = write_unique_shard(tmp_path / "s", lengths)
    (train, _, _) = build_datasets(str(tmp_path / "s"), None, "1", seq_len, 0, (5, 0, 0))
    inputs = np.concatenate([train[i][:-1] for i in range(5)])
    targets = np.concatenate([train[i][1:] for i in range(5)])
    everything = np.concatenate(docs)
    # Every token is an input exactly once; the very last one is only a target.
    assert sorted(set(inputs.tolist()) | set(targets.tolist())) == everything.tolist()
    assert np.unique(inputs).size == 40


def test_epochs_reshuffle_and_order_is_a_pure_function(shard, tmp_path: Path) -> None:
    prefix, docs = shard
    train, _, _ = build_datasets([str(prefix)], None, "1", 32, 3, (None, 0, 0))
    per_epoch = train.samples_per_epoch
    long_run, _, _ = build_datasets([str(prefix)], None, "1", 32, 3, (int(per_epoch * 2.5), 0, 0))
    assert len(long_run) == int(per_epoch * 2.5) and long_run.num_epochs == 3
    epoch = [np.stack([long_run[e * per_epoch + j] for j in range(per_epoch)]) for e in range(2)]
    # Each epoch covers the data once, in a different order (fresh document and sample shuffles).
    for e in range(2):
        inputs = epoch[e][:, :-1].reshape(-1)
        assert np.unique(inputs).size == inputs.size
    assert not np.array_equal(epoch[0], epoch[1])
    # Asking for more samples only appends: the shorter run is a prefix of the longer one.
    np.testing.assert_array_equal(np.stack([train[j] for j in range(per_epoch)]), epoch[0])
    # Same seed in a fresh cache directory -> identical order; another seed -> another order.
    again, _, _ = build_datasets([str(prefix)], None, "1", 32, 3, (per_epoch, 0, 0), cache_dir=tmp_path / "c2")
    np.testing.assert_array_equal(np.stack([again[j] for j in range(per_epoch)]), epoch[0])
    other, _, _ = build_datasets([str(prefix)], None, "1", 32, 4, (per_epoch, 0, 0), cache_dir=tmp_path / "c3")
    assert not np.array_equal(np.stack([other[j] for j in range(per_epoch)]), epoch[0])


def test_sampler_slices_ranks_and_resumes() -> None:
    total, micro, world = 100, 3, 2
    ranks = [list(PretrainingSampler(total, 0, micro, r, world)) for r in range(world)]
    assert len(ranks[0]) == len(ranks[1]) == total // (micro * world)
    for step, (a, b) in enumerate(zip(*ranks)):
        group = list(range(step * micro * world, (step + 1) * micro * world))
        assert a == group[:micro] and b == group[micro:]  # contiguous, disjoint, union = global batch
    # Resuming at consumed sample k continues exactly where the uninterrupted run was.
    for k in (0, 6, 42, 96):
        resumed = [list(PretrainingSampler(total, k, micro, r, world)) for r in range(world)]
        for r in range(world):
            assert resumed[r] == ranks[r][k // (micro * world) :]
    assert list(PretrainingSampler(10, 10, 2, 0, 1)) == []
    with pytest.raises(ValueError, match="data_parallel_rank=2"):
        PretrainingSampler(10, 0, 1, 2, 2)
    with pytest.raises(ValueError, match="consumed_samples=11"):
        PretrainingSampler(10, 11, 1, 0, 1)


def test_resume_reproduces_the_tail_of_samples(shard) -> None:
    prefix, _ = shard
    train, _, _ = build_datasets([str(prefix)], None, "1", 16, 11, (300, 0, 0))
    full = [train[i] for batch in PretrainingSampler(300, 0, 4, 1, 2) for i in batch]
    rebuilt, _, _ = build_datasets([str(prefix)], None, "1", 16, 11, (300, 0, 0))  # a new process: from the cache
    resumed = [rebuilt[i] for batch in PretrainingSampler(300, 48, 4, 1, 2) for i in batch]
    assert len(resumed) == len(full) - 24
    np.testing.assert_array_equal(np.stack(resumed), np.stack(full[24:]))


def test_index_cache_next_to_shards_reused_and_rebuilt_when_stale(tmp_path: Path, monkeypatch) -> None:
    prefix = tmp_path / "data" / "s"
    write_unique_shard(prefix, random_lengths(1, 50))
    first, _, _ = build_datasets([str(prefix)], None, "1", 8, 0, (50, 0, 0))
    cache = tmp_path / "data" / "index_cache"
    metas = list(cache.glob("s.train.*.json"))
    assert len(metas) == 1 and json.loads(metas[0].read_text())["seq_len"] == 8
    expected = np.stack([first[i] for i in range(50)])

    def no_rebuild(*args, **kwargs):
        raise AssertionError("index arrays were rebuilt although the cache is valid")

    monkeypatch.setattr(index_cache, "build_epoch", no_rebuild)
    cached, _, _ = build_datasets([str(prefix)], None, "1", 8, 0, (50, 0, 0))
    np.testing.assert_array_equal(np.stack([cached[i] for i in range(50)]), expected)
    monkeypatch.undo()

    # Rewrite the shard with other documents: the fingerprint changes and the indices are rebuilt.
    write_unique_shard(prefix, random_lengths(2, 50), base=10_000)
    fresh, _, _ = build_datasets([str(prefix)], None, "1", 8, 0, (50, 0, 0))
    assert fresh[0].min() >= 10_000
    assert len(list(cache.glob("s.train.*.json"))) == 1


def test_an_index_array_that_another_node_wrote_is_waited_for(tmp_path: Path, monkeypatch) -> None:
    """Issue 33, item 6: beside its JSON (written last) an index array that this node does not see yet was taken
    for a stale cache and rebuilt; it is waited for, bounded, and one that never comes is named."""
    import threading

    from runtime.sharedfs import WAIT_ENV, FileWaitTimeout

    prefix = tmp_path / "data" / "s"
    write_unique_shard(prefix, random_lengths(1, 50))
    build_datasets([str(prefix)], None, "1", 8, 0, (50, 0, 0))
    [order] = (tmp_path / "data" / "index_cache").glob("s.train.*.order.npy")
    hidden = tmp_path / "order.npy"
    order.rename(hidden)
    threading.Timer(0.5, hidden.rename, args=(order,)).start()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the index was rebuilt instead of waiting for the array another rank wrote")

    monkeypatch.setattr(index_cache, "build_epoch", no_rebuild)
    build_datasets([str(prefix)], None, "1", 8, 0, (50, 0, 0))
    order.rename(hidden)
    monkeypatch.setenv(WAIT_ENV, "0.2")
    with pytest.raises(FileWaitTimeout, match=f"{order} did not appear within 0.2 s, although the rank that built"):
        build_datasets([str(prefix)], None, "1", 8, 0, (50, 0, 0))


def test_read_only_shard_dir_uses_user_cache(tmp_path: Path, monkeypatch) -> None:
    prefix = tmp_path / "ro" / "s"
    write_unique_shard(prefix, random_lengths(3, 30))
    monkeypatch.setattr(index_cache, "writable_dir", lambda path: False)
    monkeypatch.setenv(index_cache.CACHE_ENV, str(tmp_path / "user_cache"))
    train, _, _ = build_datasets([str(prefix)], None, "1", 8, 0, (20, 0, 0), vocab_size=100_000)
    assert len(train) == 20
    assert not (tmp_path / "ro" / "index_cache").exists()
    assert list((tmp_path / "user_cache").glob("s-*/s.train.*.order.npy"))


def test_blend_indices_track_the_weights() -> None:
    weights = [0.2, 0.3, 0.5]
    sources, ranks = blend_indices(weights, 5000)
    for n in (10, 100, 1000, 5000):
        counts = np.bincount(sources[:n], minlength=3)
        assert np.all(np.abs(counts - np.asarray(weights) * n) <= 2.5)
    for s in range(3):  # each source's samples are taken in order 0, 1, 2, ...
        np.testing.assert_array_equal(ranks[sources == s], np.arange((sources == s).sum()))
    shorter, _ = blend_indices(weights, 777)
    np.testing.assert_array_equal(shorter, sources[:777])


def test_blended_datasets_observed_proportions(tmp_path: Path) -> None:
    prefixes = []
    for k in range(3):
        prefix = tmp_path / f"src{k}"
        write_unique_shard(prefix, random_lengths(10 + k, 60), base=k * 1_000_000)
        prefixes.append(str(prefix))
    weights = [1.0, 3.0, 6.0]
    train, valid, _ = build_datasets(prefixes, weights, "90,10,0", 16, 5, (2000, 100, 0), vocab_size=3_000_000)
    assert isinstance(train, BlendedDataset) and len(train) == 2000 and len(valid) == 100
    source_of = np.array([int(train[i][0]) // 1_000_000 for i in range(2000)])
    observed = np.bincount(source_of, minlength=3) / 2000
    np.testing.assert_allclose(observed, np.asarray(weights) / sum(weights), atol=0.01)
    # Each source's samples are its own GPTDataset's, so a source repeats only after its epoch is used up.
    assert all(isinstance(d, GPTDataset) for d in train.datasets)
    # No weights: weighted by tokens.
    by_size, _, _ = build_datasets(prefixes, None, "1", 16, 5, (500, 0, 0))
    tokens = np.array([IndexedDataset(p).num_tokens for p in prefixes], dtype=float)
    np.testing.assert_allclose(by_size.weights, tokens / tokens.sum())


def test_blend_weight_errors(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_unique_shard(a, [50] * 5)
    write_unique_shard(b, [50] * 5)
    with pytest.raises(ValueError, match=r"blend weights must be finite and >= 0; got \[0.5, -0.5\]"):
        build_datasets([str(a), str(b)], [0.5, -0.5], "1", 8, 0, (10, 0, 0))
    with pytest.raises(ValueError, match=r"1 blend weights \[1.0\] for 2 prefixes"):
        build_datasets([str(a), str(b)], [1.0], "1", 8, 0, (10, 0, 0))
    with pytest.raises(ValueError, match="sum to 0"):
        build_datasets([str(a), str(b)], [0, 0], "1", 8, 0, (10, 0, 0))


def test_input_checks(tmp_path: Path) -> None:
    prefix = tmp_path / "s"
    write_unique_shard(prefix, [40] * 10)  # ids 0..399
    with pytest.raises(ValueError, match=r"seq_len=2048 exceeds the model's max_position_embeddings=1024"):
        build_datasets([str(prefix)], None, "1", 2048, 0, (10, 0, 0), max_position_embeddings=1024)
    with pytest.raises(ValueError, match=r"holds token id 399, but the model's vocab_size is 300"):
        build_datasets([str(prefix)], None, "1", 8, 0, (10, 0, 0), vocab_size=300)
    build_datasets([str(prefix)], None, "1", 8, 0, (10, 0, 0), vocab_size=400)  # 399 < 400 is fine
    with pytest.raises(ValueError, match=r"valid split of .* holds 40 tokens, fewer than one sample"):
        build_datasets([str(prefix)], None, "90,10,0", 64, 0, (10, 10, 0))
    with pytest.raises(FileNotFoundError, match=r"missing\.idx"):
        build_datasets([str(tmp_path / "missing")], None, "1", 8, 0, (10, 0, 0))
    with pytest.raises(ValueError, match="num_samples"):
        build_datasets([str(prefix)], None, "1", 8, 0, (10, 0))
    train, valid, test = build_datasets([str(prefix)], None, "100,0,0", 8, 0, (10, 5, 5))
    assert len(train) == 10 and valid is None and test is None
    with pytest.raises(IndexError):
        train[10]


def test_datasets_pickle_small_for_dataloader_workers(tmp_path: Path) -> None:
    prefixes = []
    for k in range(2):
        write_unique_shard(tmp_path / f"p{k}", [5000] * 40, base=k * 1_000_000)  # 200k tokens each
        prefixes.append(str(tmp_path / f"p{k}"))
    train, _, _ = build_datasets(prefixes, [0.5, 0.5], "1", 32, 0, (3000, 0, 0))
    blob = pickle.dumps(train)
    assert len(blob) < 50_000  # the shards (1.6 MB) and index arrays are re-mapped, not copied
    copy = pickle.loads(blob)
    for i in (0, 1, 1234, 2999):
        np.testing.assert_array_equal(copy[i], train[i])
