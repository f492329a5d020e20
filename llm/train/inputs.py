"""The LLM trainer's inputs: shards (or the embedded corpus), tokenizer, train/validation datasets and their loaders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.errors import TrainingError, print_error

from .config import TrainConfig


@dataclass
class Inputs:
    tokenizer_dir: str
    tokenizer: Any
    split: str
    train_ds: Any
    valid_ds: Any | None  # None: the split gives validation no documents (allowed only with eval_iters=0)


def resolve_sources(cfg: TrainConfig) -> tuple[list[str], list[float] | None, str, str]:
    """(shard prefixes, weights, tokenizer directory, split): the given shards, or the embedded corpus."""
    from llm.data import ensure_corpus, parse_data_path

    if cfg.data_path:
        prefixes, weights = parse_data_path(cfg.data_path)
        if cfg.tokenizer is None:
            raise TrainingError(
                "data_path is set but tokenizer is not; pass --tokenizer DIR (an HF tokenizer "
                "directory, e.g. from python -m llm.data.tokenizer train)"
            )
        tokenizer_dir, split = cfg.tokenizer, cfg.split or "969,30,1"
    else:
        corpus = ensure_corpus(cfg.corpus)
        prefixes, weights = [corpus.prefix], None
        tokenizer_dir, split = cfg.tokenizer or str(corpus.tokenizer_dir), cfg.split or corpus.split
    missing = [p for p in prefixes if not (Path(f"{p}.bin").is_file() and Path(f"{p}.idx").is_file())]
    if missing:
        raise TrainingError(f"data_path: no shards {missing[0]}.bin/.idx; prepare them with python -m llm.data.prepare")
    return prefixes, weights, str(tokenizer_dir), split


def build_inputs(cfg: TrainConfig, model_config: Any, train_iters: int, rank: int) -> Inputs:
    from llm.data import build_datasets, load_tokenizer

    prefixes, weights, tokenizer_dir, split = resolve_sources(cfg)
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > model_config.vocab_size:
        raise TrainingError(
            f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but model {cfg.model!r} has "
            f"vocab_size={model_config.vocab_size}; use a model with vocab_size >= {len(tokenizer)} "
            f"(--model_overrides '{{\"vocab_size\": {len(tokenizer)}}}') or a smaller tokenizer"
        )
    train_samples = train_iters * cfg.global_batch_size
    valid_samples = max(cfg.eval_iters, 1) * cfg.global_batch_size
    train_ds, valid_ds, _ = build_datasets(
        prefixes,
        weights,
        split,
        cfg.seq_len,
        cfg.seed,
        (train_samples, valid_samples, 0),
        vocab_size=model_config.vocab_size,
        max_position_embeddings=model_config.max_position_embeddings,
        cache_dir=cfg.data_cache_dir,
    )
    if valid_ds is None:
        _without_validation(cfg, prefixes, split, rank)
    return Inputs(tokenizer_dir, tokenizer, split, train_ds, valid_ds)


def _without_validation(cfg: TrainConfig, prefixes: list[str], split: str, rank: int) -> None:
    """The split gives the validation set no documents: refused, since the run would end with no validation loss; a
    warning only when evaluation is off (eval_iters=0)."""
    from llm.data.data_path import parse_split, split_ranges
    from llm.data.indexed_dataset import IndexedDataset

    documents = sum(IndexedDataset(p).num_documents for p in prefixes)
    where = (
        f"the {documents} documents of {prefixes[0]}"
        if len(prefixes) == 1
        else f"the {documents} documents of {len(prefixes)} shards"
    )
    if parse_split(split)[1] == 0:
        fix = "give it a validation part, e.g. --split 90,10,0"
    else:
        needed = next(
            (n for n in range(documents + 1, 10**6) if split_ranges(n, split)[1][1] > split_ranges(n, split)[1][0]),
            None,
        )
        more = f"a corpus of at least {needed} documents" if needed else "a bigger corpus"
        fix = f"pass e.g. --split 80,20,0 or use {more}"
    message = f"split={split!r} gives the validation split none of {where}"
    if cfg.eval_iters == 0:
        if rank == 0:
            print_error(
                f"{message}; evaluation is off (eval_iters=0), so this run reports no validation loss", "warning"
            )
        return
    raise TrainingError(
        f"{message}, so the run would end without a validation loss; {fix}, or turn evaluation off with --eval_iters 0"
    )


def _collate(samples: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(samples).astype(np.int64))


def loader(
    dataset: Any, consumed_samples: int, micro_batch_size: int, rank: int, world: int, device: torch.device
) -> torch.utils.data.DataLoader:
    """Micro-batches of this rank from `consumed_samples` on (Megatron's sampler: resumable exactly)."""
    from llm.data import PretrainingSampler

    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, rank, world)
    # A copy from pinned memory can be queued without waiting; from pageable memory, a blocking host-to-GPU copy
    # synchronises the stream, i.e. waits for the previous micro-batch's backward: a host sync per micro-batch.
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=_collate, num_workers=0, pin_memory=device.type == "cuda"
    )
