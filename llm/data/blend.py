"""Blending several datasets by weight, deterministically and independent of the number of samples requested.

Sample i comes from source d where d is the i-th smallest "due time" (k + 1/2) / w_d over all sources d and their
k-th samples: after any n samples each source has contributed within one sample of w_d * n (plus half the number of
sources), and asking for more samples (a longer run) only appends - so resuming at consumed sample k stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


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

    def __init__(
        self, datasets: Sequence[torch.utils.data.Dataset | None], weights: Sequence[float], num_samples: int
    ) -> None:
        self.datasets = list(datasets)
        self.weights = list(weights)
        self.dataset_index, self.dataset_sample_index = blend_indices(weights, num_samples)
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for source, (dataset, needed) in enumerate(zip(self.datasets, counts)):
            if needed and (dataset is None or len(dataset) < needed):
                raise ValueError(
                    f"blend source {source} supplies {0 if dataset is None else len(dataset)} samples "
                    f"but the blend needs {needed}"
                )

    def __len__(self) -> int:
        return int(self.dataset_index.size)

    def __getitem__(self, index: int) -> np.ndarray:
        if index < 0:
            index += len(self)
        source = int(self.dataset_index[index])
        return self.datasets[source][int(self.dataset_sample_index[index])]
