"""Reading a corpus: local text / JSONL / parquet / arrow files, a `save_to_disk` folder, or a hub dataset, as one
`datasets.Dataset` of documents.

Shared by the tokenizer trainer (llm.data.tokenizer reads the text it learns from) and the shard writer
(llm.data.prepare tokenizes it), which imports the tokenizer: so it is a module of its own, not part of either.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from pathlib import Path

COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
FORMAT_OF_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".rst": "text",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
TEXT_UNITS = ("document", "paragraph", "line")


def resolve_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand glob patterns (for quoted arguments) and check that every input exists."""
    if not inputs:
        raise ValueError("no input files given; pass --input FILE [FILE ...] (globs allowed)")
    paths: list[Path] = []
    missing: list[str] = []
    for item in inputs:
        text = str(item)
        if Path(text).exists():
            paths.append(Path(text))
            continue
        matches = sorted(glob.glob(text, recursive=True)) if any(c in text for c in "*?[") else []
        if matches:
            paths.extend(Path(m) for m in matches)
        else:
            missing.append(text)
    if missing:
        raise FileNotFoundError(
            f"--input: corpus input(s) not found: {', '.join(missing)}; give existing files, or a "
            f"quoted glob that matches some"
        )
    return paths


def _format_of(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return "save_to_disk"
        raise ValueError(f"{path} is a directory but not a `datasets` save_to_disk folder; pass its files instead")
    name = path.name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    fmt = FORMAT_OF_SUFFIX.get(Path(name).suffix)
    if fmt is None:
        raise ValueError(
            f"cannot tell the format of {path}: known suffixes are {', '.join(sorted(FORMAT_OF_SUFFIX))} "
            f"(optionally compressed: {', '.join(COMPRESSION_SUFFIXES)})"
        )
    return fmt


def check_local_inputs(inputs: Sequence[str | Path], text_unit: str = "document") -> tuple[list[Path], str]:
    """The input files (globs expanded) and their one format; raises before anything is read or written."""
    paths = resolve_inputs(inputs)
    formats = {_format_of(p) for p in paths}
    if len(formats) != 1:
        raise ValueError(
            f"inputs mix formats {sorted(formats)}; prepare each format into its own shard prefix "
            f"and blend them at training time"
        )
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"text_unit={text_unit!r}; use one of {TEXT_UNITS}")
    empty = [p for p in paths if p.is_file() and p.stat().st_size == 0]
    if empty:
        raise ValueError(
            f"--input {empty[0]} is empty (0 bytes): it holds no documents; remove it from --input or fill it"
        )
    return paths, formats.pop()


def _compressed(path: Path) -> bool:
    return path.name.lower().endswith(COMPRESSION_SUFFIXES)


def find_bad_line(paths: Sequence[Path], fmt: str) -> str | None:
    """Why `datasets` could not read these text or JSON files, as one line naming the file, the line and the fix;
    None when no line is at fault. Read only after a failure: the common path pays nothing."""
    for path in paths:
        if fmt not in ("text", "json") or path.is_dir() or _compressed(path):
            continue
        if fmt == "json" and path.suffix.lower() == ".json":
            try:  # a .json file may be one JSON document over many lines rather than JSON lines
                json.loads(path.read_bytes())
                continue
            except ValueError:
                pass
        blank = True
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    return (
                        f"--input {path}:{number}: byte 0x{raw[err.start]:02x} at column {err.start + 1} is not "
                        f"UTF-8; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name} > "
                        f"{path.stem}.utf8{path.suffix}) or fix that line"
                    )
                if fmt != "json" or not line.strip():
                    continue
                blank = False
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    return (
                        f"--input {path}:{number}: not valid JSON ({err.msg}, column {err.colno}); fix or remove "
                        f"that line (JSON lines: one object per line)"
                    )
                if not isinstance(record, dict):
                    return (
                        f"--input {path}:{number}: a JSON {type(record).__name__}, not an object; JSON lines hold "
                        f'one object per line, e.g. {{"text": "..."}}'
                    )
        if fmt == "json" and blank:
            return f"--input {path} holds only blank lines: no documents; remove it from --input or fill it"
    return None


def find_missing_text(paths: Sequence[Path], fmt: str, text_key: str) -> str | None:
    """Where the first JSON record without a text field `text_key` is ("FILE:LINE"), or None (other formats: the
    caller names the record by its position)."""
    if fmt != "json":
        return None
    for path in paths:
        if _compressed(path):
            continue
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return None  # a .json document over many lines: positions only
                if isinstance(record, dict) and not isinstance(record.get(text_key), str):
                    return f"{path}:{number}"
    return None


def load_corpus(
    inputs: Sequence[str | Path] = (),
    *,
    text_key: str = "text",
    text_unit: str = "document",
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    dataset_split: str = "train",
    cache_dir: str | Path | None = None,
):
    """A `datasets.Dataset` whose column `text_key` holds the documents' text."""
    import datasets

    if dataset_name is not None:
        if inputs:
            raise ValueError("pass either --input files or --dataset NAME, not both")
        try:
            corpus = datasets.load_dataset(dataset_name, dataset_config, split=dataset_split)
        except Exception as err:  # offline, unknown name, wrong config: datasets raises many types
            raise ValueError(
                f"could not load hub dataset {dataset_name!r} (config {dataset_config!r}, split "
                f"{dataset_split!r}): {err}. Offline? Download it once, or pass local files"
            ) from err
    else:
        paths, fmt = check_local_inputs(inputs, text_unit)
        if fmt == "save_to_disk":
            loaded = [datasets.load_from_disk(str(p)) for p in paths]
            if any(isinstance(d, datasets.DatasetDict) for d in loaded):
                raise ValueError(f"{paths} hold a DatasetDict; pass the folder of one split")
            corpus = datasets.concatenate_datasets(loaded) if len(loaded) > 1 else loaded[0]
        else:
            files = [str(p) for p in paths]
            extra = {"sample_by": text_unit, "keep_linebreaks": True} if fmt == "text" else {}
            try:
                corpus = datasets.load_dataset(
                    fmt,
                    data_files=files,
                    split="train",
                    cache_dir=None if cache_dir is None else str(cache_dir),
                    **extra,
                )
            except Exception as err:  # datasets wraps a bad line in a long DatasetGenerationError: find the line
                found = find_bad_line(paths, fmt)
                if found is None:
                    cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    found = f"--input {', '.join(files)}: the {fmt} reader failed ({cause}); check these files"
                raise ValueError(found) from err
            if fmt == "text" and text_key != "text":
                corpus = corpus.rename_column("text", text_key)  # the text builder always names it 'text'
    if text_key not in corpus.column_names:
        raise ValueError(
            f"the corpus has no field {text_key!r} (fields: {corpus.column_names}); pick one with --text-key"
        )
    return corpus
