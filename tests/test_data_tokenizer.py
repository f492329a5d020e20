"""sentencepiece BPE training and its Hugging Face export: same ids, offline loading, clear errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from llm.data.corpus import shakespeare_files
from llm.data.tokenizer import load_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SAMPLES = [
    "To be, or not to be: that is the question.",
    " a leading space",
    "   three leading spaces and  two   inside",
    "trailing space ",
    "lines\n\nand\ttabs\n",
    "digits 1234567 and 3.14159",
    "Ünïcödé façade – 日本語 🎭 (byte fallback)",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(shakespeare_files()[:3], 1000, out)


def test_directory_layout_and_special_tokens(small_tokenizer: Path) -> None:
    names = {p.name for p in small_tokenizer.iterdir()}
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    tok = load_tokenizer(small_tokenizer)
    assert len(tok) == 1000
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.padding_side == "left"
    sp = spm.SentencePieceProcessor(model_file=str(small_tokenizer / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.get_piece_size()) == (0, 1, 2, -1, 1000)
    # BOS is added by default (LLaMA), EOS is not; padding uses id 0 on the left.
    assert tok("hello").input_ids == [1] + sp.encode("hello")
    batch = tok(["a", "a longer line"], padding=True)
    assert batch.input_ids[0][0] == 0 and batch.attention_mask[0][0] == 0


def test_ids_equal_sentencepiece(small_tokenizer: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(small_tokenizer / "tokenizer.model"))
    tok = load_tokenizer(small_tokenizer)
    play = shakespeare_files()[10].read_text()[:30000]  # a play the tokenizer was not trained on
    for text in SAMPLES + [play]:
        expected = sp.encode(text)
        assert tok(text, add_special_tokens=False).input_ids == expected, repr(text[:40])
        assert tok.decode(expected) == sp.decode(expected)
    # Byte fallback: unseen characters become byte pieces, never <unk>.
    assert 0 not in sp.encode(SAMPLES[6])


def test_cli_trains_a_directory_that_loads_offline(tmp_path: Path) -> None:
    """The CLI output loads through AutoTokenizer with the hub unreachable, from a copied location too."""
    src = shakespeare_files()[0]
    out = tmp_path / "cli_tok"
    script = f"""
import json, shutil, sys
from pathlib import Path
import sentencepiece as spm
from transformers import AutoTokenizer
from llm.data.tokenizer import main
assert main(["train", "--input", {str(src)!r}, "--vocab-size", "700", "--out", {str(out)!r}]) == 0
moved = Path(shutil.copytree({str(out)!r}, {str(tmp_path / "moved")!r}))
tok = AutoTokenizer.from_pretrained(str(moved))
sp = spm.SentencePieceProcessor(model_file=str(moved / "tokenizer.model"))
texts = {SAMPLES!r}
print(json.dumps({{"same": all(tok(t, add_special_tokens=False).input_ids == sp.encode(t) for t in texts),
                  "len": len(tok), "cls": type(tok).__name__}}))
"""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "empty_hf_home"),
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[0]) == {"tokenizer_dir": str(out), "vocab_size": 700}
    assert json.loads(lines[-1]) == {"same": True, "len": 700, "cls": "TokenizersBackend"}
    assert not (tmp_path / "empty_hf_home" / "hub").exists()  # nothing was fetched or cached from the hub


def test_missing_input_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        train_tokenizer([tmp_path / "nope.txt"], 1000, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_input(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt"):
        train_tokenizer([empty], 1000, tmp_path / "out")


def test_vocab_size_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small"):
        train_tokenizer(shakespeare_files()[:1], 100, tmp_path / "out")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a small corpus\nwith few words\n")
    with pytest.raises(ValueError, match=r"tiny\.txt.*[Vv]ocabulary size"):
        train_tokenizer([tiny], 5000, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.txt"]  # no half-built directory


def test_vocab_size_advice_works_on_real_text(tmp_path: Path) -> None:
    """The advised least vocabulary trains on real English text (the whole Shakespeare corpus); "at least 260" did not:
    every distinct character needs an id on top of the 259 reserved ones."""
    files = shakespeare_files()
    with pytest.raises(ValueError, match=r"vocab_size=200 is too small") as small:
        train_tokenizer(files, 200, tmp_path / "a")
    english = int(re.search(r"\((\d+) in all for English text", str(small.value)).group(1))
    with pytest.raises(ValueError, match=r"vocab_size=300 is too small for .*distinct characters") as exact:
        train_tokenizer(files, 300, tmp_path / "b")
    advised = int(re.search(r"use at least (\d+)", str(exact.value)).group(1))
    assert advised == english  # the up-front advice is the measured least for this corpus
    assert len(load_tokenizer(train_tokenizer(files, advised, tmp_path / "c"))) == advised
    with pytest.raises(ValueError, match=rf"use at least {advised}"):
        train_tokenizer(files, advised - 1, tmp_path / "d")  # and it is the least
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_load_tokenizer_needs_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
