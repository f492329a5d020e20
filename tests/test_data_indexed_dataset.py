"""Megatron indexed-dataset shards: byte format, round trips, atomic writes, corrupt files."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from llm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, dtype_for_vocab


def read_idx_from_spec(path: Path) -> dict:
    """A minimal reader written from the format description (not from our module) to check the bytes we write."""
    raw = path.read_bytes()
    magic = raw[:9]
    version, code, num_seq, num_doc = struct.unpack("<QBQQ", raw[9:34])
    pos = 34
    sizes = list(struct.unpack(f"<{num_seq}i", raw[pos : pos + 4 * num_seq]))
    pos += 4 * num_seq
    pointers = list(struct.unpack(f"<{num_seq}q", raw[pos : pos + 8 * num_seq]))
    pos += 8 * num_seq
    doc_index = list(struct.unpack(f"<{num_doc}q", raw[pos : pos + 8 * num_doc]))
    pos += 8 * num_doc
    return dict(
        magic=magic,
        version=version,
        code=code,
        sizes=sizes,
        pointers=pointers,
        doc_index=doc_index,
        trailing=len(raw) - pos,
    )


def random_docs(rng: np.random.Generator, count: int, high: int) -> list[np.ndarray]:
    return [rng.integers(0, high, size=int(rng.integers(1, 40))) for _ in range(count)]


@pytest.mark.parametrize(("dtype", "code", "high"), [(np.uint16, 8, 65536), (np.int32, 4, 2**31 - 1)])
def test_round_trip_and_bytes_match_the_spec(tmp_path: Path, dtype, code: int, high: int) -> None:
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 25, high)
    docs[3] = np.array([high - 1, 0, high - 1])  # extreme ids survive the dtype
    prefix = tmp_path / "shard"
    with IndexedDatasetBuilder(prefix, dtype=dtype) as builder:
        for doc in docs:
            builder.add_document(doc)

    spec = read_idx_from_spec(tmp_path / "shard.idx")
    itemsize = np.dtype(dtype).itemsize
    lengths = [len(d) for d in docs]
    assert spec["magic"] == b"MMIDIDX\x00\x00"
    assert spec["version"] == 1
    assert spec["code"] == code
    assert spec["sizes"] == lengths
    assert spec["pointers"] == [itemsize * sum(lengths[:i]) for i in range(len(docs))]
    assert spec["doc_index"] == list(range(len(docs) + 1))
    assert spec["trailing"] == 0
    expected_bin = np.concatenate(docs).astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    assert (tmp_path / "shard.bin").read_bytes() == expected_bin

    shard = IndexedDataset(prefix)
    assert len(shard) == len(docs) and shard.num_documents == len(docs)
    assert shard.dtype == np.dtype(dtype)
    assert shard.num_tokens == sum(lengths)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(shard[i], doc)
    np.testing.assert_array_equal(shard[-1], docs[-1])
    np.testing.assert_array_equal(shard.get(3, 1, 2), docs[3][1:3])
    assert shard.max_token_id() == high - 1
    # The '.bin'/'.idx' spelling of the prefix names the same shard.
    assert len(IndexedDataset(f"{prefix}.bin")) == len(docs)


def test_documents_of_several_sequences(tmp_path: Path) -> None:
    """Megatron's --split-sentences shards: one document spans several sequences."""
    with IndexedDatasetBuilder(tmp_path / "s", dtype=np.uint16) as builder:
        builder.add_item([1, 2, 3])
        builder.add_item([4])
        builder.end_document()
        builder.add_document([5, 6])
        builder.add_documents(np.array([7, 8, 9]), np.array([1, 2]))
    spec = read_idx_from_spec(tmp_path / "s.idx")
    assert spec["sizes"] == [3, 1, 2, 1, 2]
    assert spec["doc_index"] == [0, 2, 3, 4, 5]
    shard = IndexedDataset(tmp_path / "s")
    assert shard.num_documents == 4 and len(shard) == 5
    np.testing.assert_array_equal(shard[4], [8, 9])


def test_dtype_for_vocab() -> None:
    assert dtype_for_vocab(8000) is np.uint16
    assert dtype_for_vocab(32000) is np.uint16
    assert dtype_for_vocab(65536) is np.uint16
    assert dtype_for_vocab(65537) is np.int32
    with pytest.raises(ValueError, match="vocab_size"):
        dtype_for_vocab(0)


def test_builder_refuses_ids_that_do_not_fit(tmp_path: Path) -> None:
    builder = IndexedDatasetBuilder(tmp_path / "s", dtype=np.uint16)
    with pytest.raises(ValueError, match=r"70000.*uint16"):
        builder.add_document([1, 70000])
    builder.abort()
    with pytest.raises(ValueError, match="float"):
        IndexedDatasetBuilder(tmp_path / "f", dtype=np.float32)
    assert list(tmp_path.iterdir()) == []


def test_failed_build_leaves_old_shard_and_no_temp_files(tmp_path: Path) -> None:
    prefix = tmp_path / "s"
    with IndexedDatasetBuilder(prefix) as builder:
        builder.add_document([1, 2, 3])
    before = (Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes())
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetBuilder(prefix) as builder:
            builder.add_document([9, 9, 9, 9])
            raise RuntimeError("boom")
    assert (Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx"]


@pytest.fixture()
def good_shard(tmp_path: Path) -> Path:
    with IndexedDatasetBuilder(tmp_path / "s", dtype=np.uint16) as builder:
        for doc in random_docs(np.random.default_rng(1), 10, 1000):
            builder.add_document(doc)
    return tmp_path / "s"


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_corrupt_index_magic(good_shard: Path) -> None:
    _patch(Path(f"{good_shard}.idx"), 0, b"NOTANIDX\x00")
    with pytest.raises(ValueError, match=r"s\.idx.*magic"):
        IndexedDataset(good_shard)


def test_corrupt_index_version(good_shard: Path) -> None:
    _patch(Path(f"{good_shard}.idx"), 9, struct.pack("<Q", 2))
    with pytest.raises(ValueError, match=r"s\.idx.*version 2, expected 1"):
        IndexedDataset(good_shard)


def test_corrupt_index_dtype_code(good_shard: Path) -> None:
    _patch(Path(f"{good_shard}.idx"), 17, struct.pack("<B", 42))
    with pytest.raises(ValueError, match="dtype code 42"):
        IndexedDataset(good_shard)
    _patch(Path(f"{good_shard}.idx"), 17, struct.pack("<B", 7))
    with pytest.raises(ValueError, match="floats"):
        IndexedDataset(good_shard)


def test_truncated_index(good_shard: Path) -> None:
    path = Path(f"{good_shard}.idx")
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"s\.idx.*truncated"):
        IndexedDataset(good_shard)


def test_inconsistent_pointers(good_shard: Path) -> None:
    _patch(Path(f"{good_shard}.idx"), 34 + 4 * 10 + 8, struct.pack("<q", 3))  # pointer of sequence 1
    with pytest.raises(ValueError, match="pointers"):
        IndexedDataset(good_shard)


def test_truncated_bin(good_shard: Path) -> None:
    path = Path(f"{good_shard}.bin")
    size = path.stat().st_size
    os.truncate(path, size - 2)
    with pytest.raises(ValueError, match=rf"s\.bin is truncated: {size - 2} bytes.*{size} bytes"):
        IndexedDataset(good_shard)


def test_missing_files(tmp_path: Path, good_shard: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing\.idx"):
        IndexedDataset(tmp_path / "nothing")
    Path(f"{good_shard}.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"s\.idx"):
        IndexedDataset(good_shard)


def test_megatron_core_reads_ours_and_we_read_theirs(tmp_path: Path) -> None:
    """megatron-core is in the test environment (Makefile: pip install --no-deps, version in constraints.txt): a
    plain import, so a missing install fails here instead of skipping."""
    import megatron.core.datasets.indexed_dataset as megatron
    import torch

    docs = random_docs(np.random.default_rng(2), 12, 60000)
    with IndexedDatasetBuilder(tmp_path / "ours", dtype=np.uint16) as builder:
        for doc in docs:
            builder.add_document(doc)
    theirs_reader = megatron.IndexedDataset(str(tmp_path / "ours"))
    assert all(np.array_equal(theirs_reader[i], doc) for i, doc in enumerate(docs))
    writer = megatron.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for doc in docs:
        writer.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    writer.finalize(str(tmp_path / "theirs.idx"))
    ours_reader = IndexedDataset(tmp_path / "theirs")
    assert all(np.array_equal(ours_reader[i], doc) for i, doc in enumerate(docs))
    assert (tmp_path / "theirs.idx").read_bytes() == (tmp_path / "ours.idx").read_bytes()
