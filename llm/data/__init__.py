"""Data pipeline: tokenizer training, corpus -> Megatron token shards, packed/blended/resumable datasets.

Names are imported lazily (PEP 562) so that `import llm.data` stays cheap and `python -m llm.data.<module>` does not
import its own module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CORPORA": "llm.data.corpus",
    "DefaultCorpus": "llm.data.corpus",
    "EmbeddedCorpus": "llm.data.corpus",
    "ensure_corpus": "llm.data.corpus",
    "ensure_default_corpus": "llm.data.corpus",
    "BlendedDataset": "llm.data.blend",
    "blend_indices": "llm.data.blend",
    "normalize_weights": "llm.data.data_path",
    "parse_data_path": "llm.data.data_path",
    "parse_split": "llm.data.data_path",
    "split_ranges": "llm.data.data_path",
    "GPTDataset": "llm.data.gpt_dataset",
    "build_datasets": "llm.data.gpt_dataset",
    "IndexedDataset": "llm.data.indexed_dataset",
    "IndexedDatasetBuilder": "llm.data.indexed_dataset",
    "dtype_for_vocab": "llm.data.indexed_dataset",
    "prepare_corpus": "llm.data.prepare",
    "PretrainingSampler": "llm.data.sampler",
    "load_tokenizer": "llm.data.tokenizer",
    "train_tokenizer": "llm.data.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
