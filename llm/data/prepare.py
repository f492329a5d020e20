"""Corpus -> token shards in the Megatron indexed format.

    python -m llm.data.prepare --input 'my/*.jsonl' --tokenizer DIR --output-prefix out/my_corpus [--num-proc 2]
                               [--overwrite]

Reads local text / JSONL / parquet / arrow files (or a `save_to_disk` folder, or a hub dataset with `--dataset`)
through the `datasets` library, tokenizes in `num_proc` processes, writes every non-empty document as
`<s> tokens </s>` (one sequence per document) and publishes `out/my_corpus.bin` + `.idx` only when complete.
Plain-text files are one document each by default (`--text-unit paragraph|line` to cut them finer).
Inputs and output are checked before anything is created; an existing shard at the prefix is replaced only with
--overwrite and only when its `PREFIX.json` shows that prepare wrote it (runtime.fsutil.claim_output). One prepare
at a time per prefix: `PREFIX.lock` (an flock held while it runs) refuses a second one at start, naming the holder.
A record without the text field is an error naming its file and line, unless --skip-missing-text leaves such records
out; skipped records are counted by reason ("skipped": {"empty": N, "missing_text": M}).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llm.data.documents import TEXT_UNITS, check_local_inputs, find_bad_line, find_missing_text, load_corpus
from llm.data.encoder import EMPTY, MISSING_TEXT, Encoder, tokenizer_info
from llm.data.indexed_dataset import IndexedDatasetBuilder, data_path, dtype_for_vocab, index_path, split_prefix
from runtime.errors import print_error
from runtime.fsutil import (
    ExclusiveLock,
    claim_output,
    created_dirs_removed_on_error,
    read_owner,
    write_text_atomic,
)
from runtime.leftovers import remove_dead

TOOL = "llm.data.prepare"
SHARD_FORMAT = "Megatron indexed dataset (MMIDIDX v1), one sequence per document"

_WRITE_BATCH = 1024  # documents per arrow batch when copying tokens into the shard


def sidecar_path(prefix: str | Path) -> Path:
    return Path(f"{split_prefix(prefix)}.json")


def lock_path(prefix: str | Path) -> Path:
    return Path(f"{split_prefix(prefix)}.lock")


def claim_shard(prefix: str, overwrite: bool) -> bool:
    """Refuse a prefix whose files prepare must not replace (runtime.fsutil.claim_output); True if it replaces."""
    sidecar = read_owner(sidecar_path(prefix))
    # Sidecars written before "written_by" existed carry the format line, which no corpus file has.
    ours = sidecar is not None and (sidecar.get("written_by") == TOOL or sidecar.get("format") == SHARD_FORMAT)
    files = [data_path(prefix), index_path(prefix), sidecar_path(prefix)]
    return claim_output(
        prefix,
        overwrite=overwrite,
        flag="--output-prefix",
        tool=TOOL,
        proof=sidecar_path(prefix),
        files=files,
        owned=ours,
    )


@dataclass
class PrepareStats:
    prefix: str
    documents: int
    skipped_empty: int
    skipped: dict[str, int]  # by reason: EMPTY, MISSING_TEXT
    tokens: int
    dtype: str
    vocab_size: int
    seconds: float
    tokens_per_second: float


def prepare_corpus(*args, **kwargs) -> str:
    """Tokenize a corpus into `output_prefix.bin/.idx`; returns the prefix. Takes `prepare_corpus_with_stats`'s
    arguments (see the module docstring)."""
    return prepare_corpus_with_stats(*args, **kwargs).prefix


def prepare_corpus_with_stats(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    output_prefix: str | Path,
    *,
    num_proc: int = 2,
    text_key: str = "text",
    text_unit: str = "document",
    prepend_bos: bool = True,
    append_eos: bool = True,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    dataset_split: str = "train",
    batch_size: int = 16,
    show_progress: bool = True,
    overwrite: bool = False,
    skip_missing_text: bool = False,
) -> PrepareStats:
    if num_proc < 1:
        raise ValueError(f"num_proc={num_proc}; it must be >= 1")
    prefix = split_prefix(output_prefix)
    # One prepare per prefix at a time: a second one would publish over the first's shard (or it over ours). Held
    # to the end; released (the file and any directory it created removed) on success and failure alike.
    try:
        lock = ExclusiveLock.acquire(
            lock_path(prefix),
            f"--output-prefix {prefix}",
            "wait for that prepare to end (or stop it), or choose another --output-prefix",
        )
    except (FileExistsError, NotADirectoryError, PermissionError) as err:  # LockBusy is a ValueError: passed on
        raise ValueError(
            f"--output-prefix {prefix}: cannot create {lock_path(prefix)} ({err}); choose a prefix in a "
            f"writable directory"
        ) from err
    try:
        return _prepare(
            inputs,
            tokenizer_dir,
            prefix,
            num_proc=num_proc,
            text_key=text_key,
            text_unit=text_unit,
            prepend_bos=prepend_bos,
            append_eos=append_eos,
            dataset_name=dataset_name,
            dataset_config=dataset_config,
            dataset_split=dataset_split,
            batch_size=batch_size,
            show_progress=show_progress,
            overwrite=overwrite,
            skip_missing_text=skip_missing_text,
        )
    except UnicodeDecodeError as err:  # pyarrow's JSON reader passes bad bytes on; decoding them fails later
        found = find_bad_line(*check_local_inputs(inputs)) if inputs else None
        raise ValueError(found or f"the corpus holds bytes that are not UTF-8 ({err}); re-encode it as UTF-8") from err
    finally:
        lock.release()


def _prepare(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    prefix: str,
    *,
    num_proc: int,
    text_key: str,
    text_unit: str,
    prepend_bos: bool,
    append_eos: bool,
    dataset_name: str | None,
    dataset_config: str | None,
    dataset_split: str,
    batch_size: int,
    show_progress: bool,
    overwrite: bool,
    skip_missing_text: bool,
) -> PrepareStats:
    import datasets
    from tqdm.auto import tqdm

    started = time.perf_counter()
    # Everything that can be checked is checked before the first directory or file is created.
    claim_shard(prefix, overwrite)
    vocab_size, bos_id, eos_id = tokenizer_info(tokenizer_dir)
    if dataset_name is None:
        check_local_inputs(inputs, text_unit)
    elif inputs:
        raise ValueError("pass either --input files or --dataset NAME, not both")
    if append_eos and eos_id is None:
        raise ValueError(f"tokenizer {tokenizer_dir} has no EOS token; pass append_eos=False (--no-eos)")
    if prepend_bos and bos_id is None:
        raise ValueError(f"tokenizer {tokenizer_dir} has no BOS token; pass prepend_bos=False (--no-bos)")
    if not show_progress:
        datasets.disable_progress_bars()
    # Local files are converted to arrow in a private scratch folder (removed afterwards) rather than the user's
    # HF cache: no stale cache entries, and two concurrent runs never share one.
    # A failure below removes the directories created for the shard, so a refused corpus leaves nothing behind.
    # The scratch folder's name says which shard it is for: the next prepare of that shard, holding its lock,
    # removes what a killed one left (runtime.leftovers).
    name = Path(prefix).name
    with (
        created_dirs_removed_on_error(Path(prefix).parent),
        tempfile.TemporaryDirectory(prefix=f".prepare-{name}-", dir=Path(prefix).parent) as scratch,
    ):
        dead = re.compile(rf"\.prepare-{re.escape(name)}-[a-z0-9_]{{8}}")  # tempfile's 8 characters
        for line in remove_dead(Path(prefix).parent, dead, Path(scratch).name, "left by a prepare that was killed"):
            print(line, file=sys.stderr)
        corpus = load_corpus(
            inputs,
            text_key=text_key,
            text_unit=text_unit,
            dataset_name=dataset_name,
            dataset_config=dataset_config,
            dataset_split=dataset_split,
            cache_dir=None if dataset_name else Path(scratch) / "hf",
        )
        if len(corpus) == 0:
            raise ValueError(f"the corpus {list(map(str, inputs)) or dataset_name} is empty (0 records)")
        workers = min(num_proc, len(corpus))
        encoder = Encoder(
            str(Path(tokenizer_dir).resolve()),
            bos_id if prepend_bos else None,
            eos_id if append_eos else None,
            threads=1 if workers > 1 else -1,
        )
        tokenized = corpus.map(
            encoder,
            fn_kwargs={"text_key": text_key},
            batched=True,
            batch_size=batch_size,
            num_proc=workers if workers > 1 else None,
            remove_columns=corpus.column_names,
            # int32 ids: half the arrow bytes of the default int64 lists
            features=datasets.Features(
                {"input_ids": datasets.Sequence(datasets.Value("int32")), "skip_reason": datasets.Value("string")}
            ),
            cache_file_name=None if dataset_name is None else str(Path(scratch) / "tokenized.arrow"),
            desc=f"tokenizing ({workers} proc)",
        )
        documents = tokens = position = 0
        skipped = {EMPTY: 0, MISSING_TEXT: 0}
        dtype = dtype_for_vocab(vocab_size)
        with IndexedDatasetBuilder(prefix, dtype=dtype) as builder:
            bar = tqdm(
                total=len(tokenized), desc=f"writing {Path(prefix).name}.bin", unit="doc", disable=not show_progress
            )
            for table in tokenized.with_format("arrow").iter(batch_size=_WRITE_BATCH):
                column = table.column("input_ids").combine_chunks()
                lengths = column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
                flat = column.flatten().to_numpy(zero_copy_only=False)
                reasons = table.column("skip_reason").to_pylist()
                if MISSING_TEXT in reasons and not skip_missing_text:
                    bar.close()  # ends the bar's line: the error gets a line of its own
                    _refuse_missing_text(inputs, text_key, position + reasons.index(MISSING_TEXT))
                for reason in (EMPTY, MISSING_TEXT):
                    skipped[reason] += reasons.count(reason)
                position += len(reasons)
                keep = lengths > 0
                builder.add_documents(flat, lengths[keep])
                documents += int(keep.sum())
                tokens += int(flat.size)
                bar.update(len(lengths))
            bar.close()
            if documents == 0:
                raise ValueError(
                    f"the corpus {list(map(str, inputs)) or dataset_name} holds no non-empty "
                    f"documents in field {text_key!r}"
                )
    seconds = time.perf_counter() - started
    stats = PrepareStats(
        prefix,
        documents,
        skipped[EMPTY],
        skipped,
        tokens,
        np.dtype(dtype).name,
        vocab_size,
        round(seconds, 3),
        round(tokens / seconds, 1),
    )
    _write_sidecar(prefix, stats, tokenizer_dir, inputs, dataset_name)
    return stats


def _refuse_missing_text(inputs: Sequence[str | Path], text_key: str, position: int) -> None:
    """Raise the one line for a record that has no text: where it is (FILE:LINE for JSON lines, else its position
    in the corpus), and the two fixes."""
    where = None
    if inputs:
        paths, fmt = check_local_inputs(inputs)
        where = find_missing_text(paths, fmt, text_key)
    if where is None:
        where = f"record {position + 1} of the corpus"
    raise ValueError(
        f"--input {where}: the record has no text in field {text_key!r} (missing, null or not a string); fix the "
        f"record, name the right field with --text-key, or pass --skip-missing-text to leave such records out "
        f"(counted in the statistics)"
    )


def _write_sidecar(prefix: str, stats: PrepareStats, tokenizer_dir, inputs, dataset_name) -> None:
    """`prefix.json`: which tokenizer and inputs produced the shard (for humans; loaders do not need it)."""
    meta = (
        {"written_by": TOOL}
        | asdict(stats)
        | {
            "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
            "inputs": [str(p) for p in inputs] if inputs else [],
            "dataset": dataset_name,
            "format": SHARD_FORMAT,
        }
    )
    write_text_atomic(sidecar_path(prefix), json.dumps(meta, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="*", default=[], help="files or quoted globs: .txt .jsonl .parquet .arrow")
    parser.add_argument("--dataset", default=None, help="a hub dataset name instead of --input (needs network)")
    parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--dataset-split", default="train")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (llm.data.tokenizer train)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--text-key", default="text", help="field holding the text (JSONL/parquet/arrow)")
    parser.add_argument(
        "--text-unit",
        default="document",
        choices=TEXT_UNITS,
        help="for plain-text files: one document per file, per paragraph or per line",
    )
    parser.add_argument("--no-bos", action="store_true", help="do not prepend <s> to each document")
    parser.add_argument("--no-eos", action="store_true", help="do not append </s> to each document")
    parser.add_argument(
        "--skip-missing-text",
        action="store_true",
        help="leave out records without the text field (counted as skipped missing_text) instead of refusing",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the shard at --output-prefix if prepare wrote it (never other files)",
    )
    args = parser.parse_args(argv)
    if not args.input and not args.dataset:
        parser.error("pass --input FILES or --dataset NAME")
    try:
        stats = prepare_corpus_with_stats(
            args.input,
            args.tokenizer,
            args.output_prefix,
            num_proc=args.num_proc,
            text_key=args.text_key,
            text_unit=args.text_unit,
            prepend_bos=not args.no_bos,
            append_eos=not args.no_eos,
            dataset_name=args.dataset,
            dataset_config=args.dataset_config,
            dataset_split=args.dataset_split,
            overwrite=args.overwrite,
            skip_missing_text=args.skip_missing_text,
        )
    except (ValueError, FileNotFoundError) as err:  # LockBusy and OutputRefused are ValueErrors
        print_error(str(err))
        return 2
    print(json.dumps(asdict(stats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
