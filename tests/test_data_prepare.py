"""Corpus -> shards through `datasets`: token-exact output, formats, atomic publication, clear errors."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

import llm.data.prepare as prepare_module
from llm.data.corpus import shakespeare_files
from llm.data.indexed_dataset import IndexedDataset
from llm.data.prepare import prepare_corpus, prepare_corpus_with_stats
from llm.data.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(shakespeare_files()[:2], 800, tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="module")
def sp(tokenizer_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))


def _documents(count: int = 40) -> list[str]:
    lines = shakespeare_files()[5].read_text().split("\n\n")
    return ["\n\n".join(lines[i * 7 : i * 7 + 7]) for i in range(count)]


def test_jsonl_two_processes_token_exact(tmp_path: Path, tokenizer_dir: Path, sp) -> None:
    docs = _documents()
    records = [{"text": t, "id": i} for i, t in enumerate(docs)]
    records.insert(5, {"text": "   ", "id": -1})  # whitespace-only: skipped and counted
    records.insert(9, {"text": "a </s> in the text stays text", "id": -2})
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records[:20]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records[20:]) + "\n")

    stats = prepare_corpus_with_stats(
        [tmp_path / "a.jsonl", tmp_path / "b.jsonl"],
        tokenizer_dir,
        tmp_path / "out" / "corpus",
        num_proc=2,
        show_progress=False,
    )
    kept = [r["text"] for r in records if r["text"].strip()]
    assert (stats.documents, stats.skipped_empty, stats.dtype, stats.vocab_size) == (len(kept), 1, "uint16", 800)
    shard = IndexedDataset(tmp_path / "out" / "corpus")
    assert shard.dtype == np.uint16 and len(shard) == len(kept)
    for i, text in enumerate(kept):  # order kept; every document is <s> tokens </s>
        assert shard[i].tolist() == [1] + sp.encode(text) + [2]
    assert shard.num_tokens == stats.tokens
    sidecar = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert sidecar["tokenizer_dir"] == str(tokenizer_dir.resolve()) and sidecar["documents"] == len(kept)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["corpus.bin", "corpus.idx", "corpus.json"]


def test_text_files_parquet_and_options(tmp_path: Path, tokenizer_dir: Path, sp) -> None:
    docs = _documents(6)
    for i, doc in enumerate(docs[:3]):
        (tmp_path / f"t{i}.txt").write_text(doc)
    prefix = prepare_corpus(
        [str(tmp_path / "t*.txt")], tokenizer_dir, tmp_path / "txt", num_proc=1, show_progress=False
    )  # a quoted glob is expanded; one document per file
    shard = IndexedDataset(prefix)
    assert [s.tolist() for s in (shard[i] for i in range(3))] == [[1] + sp.encode(d) + [2] for d in docs[:3]]

    paragraphs = prepare_corpus(
        [tmp_path / "t0.txt"],
        tokenizer_dir,
        tmp_path / "para",
        text_unit="paragraph",
        prepend_bos=False,
        show_progress=False,
    )
    expected = [p for p in docs[0].split("\n\n") if p.strip()]
    shard = IndexedDataset(paragraphs)
    assert len(shard) == len(expected)
    assert shard[0].tolist()[-1] == 2 and shard[0].tolist()[0] != 1

    pq.write_table(pa.table({"content": docs, "n": list(range(6))}), tmp_path / "d.parquet")
    shard = IndexedDataset(
        prepare_corpus(
            [tmp_path / "d.parquet"],
            tokenizer_dir,
            tmp_path / "pq",
            text_key="content",
            append_eos=False,
            show_progress=False,
        )
    )
    assert [shard[i].tolist() for i in range(6)] == [[1] + sp.encode(d) for d in docs]


def test_interrupted_run_leaves_no_half_shard(tmp_path: Path, tokenizer_dir: Path, monkeypatch) -> None:
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in _documents(30)) + "\n")
    old = prepare_corpus([tmp_path / "c.jsonl"], tokenizer_dir, tmp_path / "out" / "c", num_proc=1, show_progress=False)
    old_bytes = (Path(f"{old}.bin").read_bytes(), Path(f"{old}.idx").read_bytes())
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in _documents(40)) + "\n")

    original = prepare_module.IndexedDatasetBuilder.add_documents
    calls = {"n": 0}

    def crash_after_first_batch(self, flat, lengths):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt("killed")
        return original(self, flat, lengths)

    monkeypatch.setattr(prepare_module.IndexedDatasetBuilder, "add_documents", crash_after_first_batch)
    monkeypatch.setattr(prepare_module, "_WRITE_BATCH", 8)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(
            [tmp_path / "c.jsonl"],
            tokenizer_dir,
            tmp_path / "out" / "c",
            num_proc=1,
            show_progress=False,
            overwrite=True,
        )
    assert calls["n"] == 2
    # The previous complete shard is untouched and nothing else (no temp file, no scratch dir) remains.
    assert (Path(f"{old}.bin").read_bytes(), Path(f"{old}.idx").read_bytes()) == old_bytes
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.bin", "c.idx", "c.json"]


def test_missing_and_empty_inputs(tmp_path: Path, tokenizer_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        prepare_corpus([tmp_path / "missing.jsonl"], tokenizer_dir, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match=r"no_such_dir.*tokenizer"):
        prepare_corpus([tmp_path / "missing.jsonl"], tmp_path / "no_such_dir", tmp_path / "x")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "\n "}) + "\n")
    with pytest.raises(ValueError, match=r"blank\.jsonl.*no non-empty documents"):
        prepare_corpus([tmp_path / "blank.jsonl"], tokenizer_dir, tmp_path / "x", show_progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt.*(empty|no non-empty)"):
        prepare_corpus([tmp_path / "empty.txt"], tokenizer_dir, tmp_path / "x", show_progress=False)
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"no field 'text'.*body.*--text-key"):
        prepare_corpus([tmp_path / "other.jsonl"], tokenizer_dir, tmp_path / "x", show_progress=False)
    with pytest.raises(ValueError, match="mix formats"):
        prepare_corpus([tmp_path / "other.jsonl", tmp_path / "empty.txt"], tokenizer_dir, tmp_path / "x")
    assert not list(tmp_path.glob("x*"))


def test_cli(tmp_path: Path, tokenizer_dir: Path, sp) -> None:
    docs = _documents(10)
    (tmp_path / "my.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs) + "\n")
    run = [sys.executable, "-m", "llm.data.prepare", "--tokenizer", str(tokenizer_dir), "--num-proc", "2"]
    ok = subprocess.run(
        run + ["--input", str(tmp_path / "*.jsonl"), "--output-prefix", str(tmp_path / "o" / "my")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    stats = json.loads(ok.stdout.strip().splitlines()[-1])
    assert stats["documents"] == 10 and stats["prefix"] == str(tmp_path / "o" / "my")
    assert IndexedDataset(tmp_path / "o" / "my")[9].tolist() == [1] + sp.encode(docs[9]) + [2]
    bad = subprocess.run(
        run + ["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "p")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "nope.jsonl" in bad.stderr and "Traceback" not in bad.stderr


def test_records_without_text_are_refused_or_skipped_and_counted_by_reason(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Issue 25: a record without the text field used to vanish into "skipped_empty"; now it is an error naming
    FILE:LINE, unless --skip-missing-text asks to leave such records out, and then it is counted as such."""
    records = [{"text": "To be"}, {"body": "no text"}, {"text": "  "}, {"text": None}, {"text": "or not to be"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=r"c\.jsonl:2: the record has no text in field 'text'.*--skip-missing-text"):
        prepare_corpus([tmp_path / "c.jsonl"], tokenizer_dir, tmp_path / "out" / "c", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no shard, no lock file, no directory
    stats = prepare_corpus_with_stats(
        [tmp_path / "c.jsonl"], tokenizer_dir, tmp_path / "out" / "c", show_progress=False, skip_missing_text=True
    )
    assert stats.documents == 2 and stats.skipped == {"empty": 1, "missing_text": 2} and stats.skipped_empty == 1
    assert json.loads((tmp_path / "out" / "c.json").read_text())["skipped"] == {"empty": 1, "missing_text": 2}


def test_a_second_prepare_into_the_same_prefix_is_refused_while_the_first_runs(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """Issue 25: two prepares into one --output-prefix both exited 0, the shard holding whichever finished last. The
    first holds PREFIX.lock (an flock) until it ends; the second is refused at start, naming the holder."""
    docs = _documents(40)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "another corpus"}) + "\n")
    prefix = tmp_path / "out" / "corpus"
    command = [sys.executable, "-m", "llm.data.prepare", "--tokenizer", str(tokenizer_dir), "--num-proc", "1"]
    command += ["--output-prefix", str(prefix), "--input"]
    first = subprocess.Popen(
        [*command, str(tmp_path / "a.jsonl")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lock = Path(f"{prefix}.lock")
    try:
        deadline = time.monotonic() + 120
        while not (lock.is_file() and f'"pid": {first.pid}' in lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # holds the lock, mid-way: the second prepare starts now
        try:
            second = subprocess.run(
                [*command, str(tmp_path / "b.jsonl")], cwd=REPO, capture_output=True, text=True, timeout=300
            )
        finally:
            first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    [line] = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert f"--output-prefix {prefix} is in use by host {socket.gethostname()}, PID {first.pid}, started " in line
    assert "or choose another --output-prefix" in line
    assert first.returncode == 0, err[-3000:]
    sidecar = json.loads(Path(f"{prefix}.json").read_text())
    assert sidecar["inputs"] == [str(tmp_path / "a.jsonl")] and sidecar["documents"] == len(docs)
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["corpus.bin", "corpus.idx", "corpus.json"]
