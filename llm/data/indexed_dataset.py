"""Token shards in the Megatron indexed-dataset format (`prefix.bin` + `prefix.idx`).

The format, as written by Megatron-LM's `tools/preprocess_data.py`, Megatron-DeepSpeed and GPT-NeoX:

`prefix.bin` holds the token ids of every sequence back to back, in one integer dtype, nothing else.

`prefix.idx` (all integers little-endian):

    offset  size      field
    0       9         magic b"MMIDIDX\\x00\\x00"
    9       8  <Q     version, always 1
    17      1  <B     dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    18      8  <Q     S = number of sequences
    26      8  <Q     D = number of entries of the document index (documents + 1)
    34      4*S int32 sequence lengths, in tokens
    ..      8*S int64 sequence pointers: byte offset of each sequence in `.bin`
    ..      8*D int64 document index: document d is sequences [doc[d], doc[d+1]); doc[0] = 0, doc[-1] = S
    (..     1*S int8  sequence modes - only in Megatron's multimodal shards; read past, not used)

We write one sequence per document (the whole document, EOS appended), so S = D - 1; shards whose documents hold
several sequences (Megatron's `--split-sentences`) load too.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from runtime.fsutil import atomic_path, publish_file, temp_path_for

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # 34 bytes

DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE: dict[np.dtype, int] = {np.dtype(t): code for code, t in DTYPE_CODES.items()}

# Pointer/size consistency is checked in chunks so that a billion-sequence index does not need a 8 GB temporary.
_CHECK_CHUNK = 1 << 24


def dtype_for_vocab(vocab_size: int) -> type[np.generic]:
    """uint16 when every id fits (vocab <= 65536), else int32 - the smallest dtype Megatron reads for tokens."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def split_prefix(path: str | Path) -> str:
    """'dir/name', 'dir/name.bin' and 'dir/name.idx' all name the shard 'dir/name'."""
    text = os.fspath(path)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix):
            return text[: -len(suffix)]
    return text


def index_path(prefix: str | Path) -> Path:
    return Path(f"{split_prefix(prefix)}.idx")


def data_path(prefix: str | Path) -> Path:
    return Path(f"{split_prefix(prefix)}.bin")


class IndexedDatasetBuilder:
    """Writes one shard. Data goes to temporary files; `finalize()` publishes `.bin` and `.idx` by rename.

    Until `finalize()` returns, no file at the final names changes - except that a stale `.idx` is removed first, so
    an interrupted publish leaves a `.bin` without `.idx` (refused on load) rather than a mismatched pair.
    """

    def __init__(self, prefix: str | Path, dtype: type[np.generic] | np.dtype = np.uint16) -> None:
        self.prefix = split_prefix(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE or self.dtype.kind not in "iu":
            allowed = ", ".join(str(np.dtype(t)) for t in DTYPE_CODES.values() if np.dtype(t).kind in "iu")
            raise ValueError(f"IndexedDatasetBuilder dtype={self.dtype} is not a token dtype; use one of {allowed}")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = temp_path_for(data_path(self.prefix))
        self._bin = open(self._bin_tmp, "wb")
        self._sizes: list[np.ndarray] = []
        self._num_sequences = 0
        # Kept as numpy chunks: a list of Python ints would cost ~36 bytes per document on 100M-document corpora.
        self._doc_ends: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self._last_doc_end = 0
        self._info = np.iinfo(self.dtype)
        self._done = False

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()

    def _check_range(self, tokens: np.ndarray) -> None:
        if tokens.size == 0:
            return
        low, high = int(tokens.min()), int(tokens.max())
        if low < self._info.min or high > self._info.max:
            raise ValueError(
                f"token ids in [{low}, {high}] do not fit the shard dtype {self.dtype} "
                f"(range [{self._info.min}, {self._info.max}]); build with dtype=dtype_for_vocab(vocab_size)"
            )

    def add_item(self, tokens: np.ndarray | list[int]) -> None:
        """Append one sequence to the current document."""
        self.add_items(np.asarray(tokens).reshape(-1), np.asarray([len(tokens)], dtype=np.int64))

    def add_items(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many sequences at once (`lengths` splits `flat_tokens`); they join the current document."""
        flat_tokens = np.asarray(flat_tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.sum() != flat_tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {flat_tokens.size} tokens were given")
        if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
            raise ValueError("sequence lengths must lie in [0, 2**31 - 1] (they are stored as int32)")
        self._check_range(flat_tokens)
        self._bin.write(flat_tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.append(lengths.astype(np.int32))
        self._num_sequences += int(lengths.size)

    def end_document(self) -> None:
        """Close the current document (the sequences added since the previous call)."""
        self._doc_ends.append(np.asarray([self._num_sequences], dtype=np.int64))
        self._last_doc_end = self._num_sequences

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        """One document made of one sequence - what `prepare` writes."""
        self.add_item(tokens)
        self.end_document()

    def add_documents(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Many one-sequence documents at once (the fast path of `prepare`)."""
        start = self._num_sequences
        self.add_items(flat_tokens, lengths)
        self._doc_ends.append(np.arange(start + 1, self._num_sequences + 1, dtype=np.int64))
        self._last_doc_end = self._num_sequences

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)
        self._done = True

    def finalize(self) -> str:
        """Write the index and publish both files; returns the prefix."""
        if self._done:
            raise RuntimeError(f"shard {self.prefix} was already finalized or aborted")
        if self._last_doc_end != self._num_sequences:
            self.end_document()  # sequences added after the last end_document() form the final document
        self._bin.close()  # publish_file fsyncs it
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, dtype=np.int32)
        pointers = np.zeros(sizes.size, dtype=np.int64)
        if sizes.size > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_index = np.concatenate(self._doc_ends)
        try:
            with atomic_path(index_path(self.prefix)) as idx_tmp:
                with open(idx_tmp, "wb") as out:
                    out.write(INDEX_MAGIC)
                    out.write(struct.pack("<Q", INDEX_VERSION))
                    out.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
                    out.write(struct.pack("<Q", sizes.size))
                    out.write(struct.pack("<Q", doc_index.size))
                    out.write(sizes.astype("<i4").tobytes())
                    out.write(pointers.astype("<i8").tobytes())
                    out.write(doc_index.astype("<i8").tobytes())
                # Drop the old index first, then publish the .bin; the block's end publishes the .idx: a crash
                # between the renames leaves no .idx, never a new .bin + old .idx.
                index_path(self.prefix).unlink(missing_ok=True)
                publish_file(self._bin_tmp, data_path(self.prefix))
        except BaseException:
            self._bin_tmp.unlink(missing_ok=True)
            raise
        self._done = True
        return self.prefix


class IndexedDataset:
    """Read-only, memory-mapped view of one shard; `ds[i]` is sequence i as a numpy array (no copy)."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = split_prefix(prefix)
        self.index_file = index_path(self.prefix)
        self.data_file = data_path(self.prefix)
        for path in (self.index_file, self.data_file):
            if not path.is_file():
                raise FileNotFoundError(
                    f"shard file {path} not found (prefix {self.prefix!r}); pass the shard prefix without "
                    f"'.bin'/'.idx' and create it with `python -m llm.data.prepare --output-prefix {self.prefix}`"
                )
        self._parse_index()
        self._check_data_file()

    def _fail(self, what: str) -> ValueError:
        return ValueError(
            f"corrupt shard index {self.index_file}: {what}. Rebuild the shard with `python -m llm.data.prepare` "
            f"(or Megatron's tools/preprocess_data.py)"
        )

    def _parse_index(self) -> None:
        file_size = self.index_file.stat().st_size
        with open(self.index_file, "rb") as handle:
            header = handle.read(HEADER_SIZE)
        if header[: len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise self._fail(f"magic {header[:9]!r}, expected {INDEX_MAGIC!r} (not a Megatron indexed dataset)")
        if len(header) < HEADER_SIZE:
            raise self._fail(f"header is {len(header)} bytes, expected {HEADER_SIZE}")
        (version,) = struct.unpack_from("<Q", header, 9)
        if version != INDEX_VERSION:
            raise self._fail(f"version {version}, expected {INDEX_VERSION}")
        (code,) = struct.unpack_from("<B", header, 17)
        if code not in DTYPE_CODES:
            raise self._fail(f"dtype code {code} is unknown (known: {sorted(DTYPE_CODES)})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        if self.dtype.kind not in "iu":
            raise self._fail(f"dtype code {code} ({self.dtype}) holds floats, not token ids")
        num_sequences, num_doc_entries = struct.unpack_from("<QQ", header, 18)
        body = 4 * num_sequences + 8 * num_sequences + 8 * num_doc_entries
        # Megatron's multimodal shards append one int8 mode per sequence; accept those bytes and ignore them.
        if file_size not in (HEADER_SIZE + body, HEADER_SIZE + body + num_sequences):
            raise self._fail(
                f"file is {file_size} bytes but its header ({num_sequences} sequences, {num_doc_entries} document "
                f"index entries) implies {HEADER_SIZE + body} (truncated or overwritten)"
            )
        if num_doc_entries < 1:
            raise self._fail("document index is empty (it must start with 0)")
        self._index_buffer = np.memmap(self.index_file, dtype=np.uint8, mode="r")
        offset = HEADER_SIZE
        self.sizes = np.frombuffer(self._index_buffer, dtype="<i4", count=num_sequences, offset=offset)
        offset += 4 * num_sequences
        self.pointers = np.frombuffer(self._index_buffer, dtype="<i8", count=num_sequences, offset=offset)
        offset += 8 * num_sequences
        self.document_indices = np.frombuffer(self._index_buffer, dtype="<i8", count=num_doc_entries, offset=offset)
        doc = self.document_indices
        if doc[0] != 0 or doc[-1] != num_sequences or np.any(np.diff(doc) < 0):
            raise self._fail(
                f"document index must rise from 0 to {num_sequences} (got first {int(doc[0])}, last {int(doc[-1])})"
            )
        itemsize = self.dtype.itemsize
        expected_next = 0
        for start in range(0, num_sequences, _CHECK_CHUNK):
            sizes = self.sizes[start : start + _CHECK_CHUNK].astype(np.int64)
            pointers = self.pointers[start : start + _CHECK_CHUNK]
            if sizes.size and sizes.min() < 0:
                raise self._fail("a sequence length is negative")
            ends = pointers + sizes * itemsize
            if pointers[0] != expected_next or np.any(pointers[1:] != ends[:-1]):
                raise self._fail("sequence pointers do not follow the sequence lengths")
            expected_next = int(ends[-1])
        self._data_bytes = expected_next

    def _check_data_file(self) -> None:
        actual = self.data_file.stat().st_size
        if actual != self._data_bytes:
            state = "truncated" if actual < self._data_bytes else "longer than its index says"
            raise ValueError(
                f"shard data {self.data_file} is {state}: {actual} bytes, but {self.index_file} describes "
                f"{self._data_bytes} bytes ({self._data_bytes // self.dtype.itemsize} tokens of {self.dtype}); the "
                f".bin and .idx are from different or interrupted runs - rebuild with `python -m llm.data.prepare`"
            )
        if actual == 0:
            self._data = np.zeros(0, dtype=self.dtype)
        else:
            self._data = np.memmap(self.data_file, dtype=self.dtype, mode="r")

    # Pickle by prefix (DataLoader workers under spawn/forkserver): pickling the memmaps would copy the whole shard.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return int(self.sizes.size)

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self.sizes

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.size - 1)

    @property
    def num_tokens(self) -> int:
        return self._data_bytes // self.dtype.itemsize

    def __getitem__(self, index: int) -> np.ndarray:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"IndexedDataset indices must be integers, got {type(index).__name__}")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences in {self.prefix}")
        return self.get(int(index))

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence `index` (to its end when length is None)."""
        size = int(self.sizes[index])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"slice [{offset}, {offset + length}) outside sequence {index} of length {size}")
        start = int(self.pointers[index]) // self.dtype.itemsize + offset
        return self._data[start : start + length]

    def max_token_id(self) -> int:
        """Largest token id in the shard (a full scan, in chunks); -1 for an empty shard."""
        best = -1
        step = 1 << 26
        for start in range(0, self._data.size, step):
            best = max(best, int(self._data[start : start + step].max()))
        return best
