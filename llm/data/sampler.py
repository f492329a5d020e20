"""Which sample indices each data-parallel rank reads, resumable from a count of consumed samples."""

from __future__ import annotations

from collections.abc import Iterator


class PretrainingSampler:
    """Yields, for THIS rank, one micro-batch of dataset indices per item (use as a DataLoader `batch_sampler`).

    Samples are consumed in index order from `consumed_samples` on (the dataset itself is already shuffled); each
    group of `micro_batch_size * data_parallel_size` consecutive indices is cut into contiguous per-rank slices,
    rank r taking `[r * micro_batch_size, (r + 1) * micro_batch_size)` of the group. A run resumed with the consumed
    count of its checkpoint therefore reads exactly the indices the interrupted run would have read next. A final
    group too small to give every rank a full micro-batch is dropped.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        if total_samples < 1:
            raise ValueError(f"total_samples={total_samples}; the dataset must hold at least one sample")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size}; it must be >= 1")
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size={data_parallel_size}; it must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank={data_parallel_rank} must lie in [0, {data_parallel_size})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} must lie in [0, total_samples={total_samples}]; a checkpoint "
                f"that consumed more samples than the dataset holds needs a larger num_samples (train budget)"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.group_size = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.group_size

    def __iter__(self) -> Iterator[list[int]]:
        first = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        for group in range(len(self)):
            start = first + group * self.group_size
            yield list(range(start, start + self.micro_batch_size))
