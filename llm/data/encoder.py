"""Tokenizing a corpus for llm.data.prepare: the picklable step that `datasets.map` workers run, and what a tokenizer
directory says (vocabulary size, BOS and EOS ids). sentencepiece when the directory has tokenizer.model (the reference
ids), else the Hugging Face tokenizer."""

from __future__ import annotations

from pathlib import Path

# Why a record was left out of the shard: only whitespace, or no text at all (the field missing, null, not a string).
EMPTY, MISSING_TEXT = "empty", "missing_text"


class Encoder:
    """Picklable tokenization step for `datasets.map` workers; loads the tokenizer lazily once per process."""

    _cache: dict[str, object] = {}

    def __init__(self, tokenizer_dir: str, bos_id: int | None, eos_id: int | None, threads: int = -1) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.bos_id = bos_id
        self.eos_id = eos_id
        # sentencepiece threads per process: all cores for one process; 1 each when num_proc processes share them.
        self.threads = threads

    def _tokenizer(self):
        tok = self._cache.get(self.tokenizer_dir)
        if tok is None:
            tok = _open_tokenizer(Path(self.tokenizer_dir))
            self._cache[self.tokenizer_dir] = tok
        return tok

    def __call__(self, batch: dict[str, list], text_key: str) -> dict[str, list]:
        reasons = [
            "" if isinstance(t, str) and t.strip() else EMPTY if isinstance(t, str) else MISSING_TEXT
            for t in batch[text_key]
        ]
        texts = [t if isinstance(t, str) else "" for t in batch[text_key]]
        tok = self._tokenizer()
        if hasattr(tok, "encode_as_ids"):  # sentencepiece: the reference ids; special-token text stays text
            ids = tok.encode(texts, num_threads=self.threads)
        else:
            ids = tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        out = []
        for text, doc in zip(texts, ids):
            if not text.strip():
                out.append([])  # dropped at write time and counted
                continue
            out.append(
                ([self.bos_id] if self.bos_id is not None else [])
                + doc
                + ([self.eos_id] if self.eos_id is not None else [])
            )
        return {"input_ids": out, "skip_reason": reasons}


def _open_tokenizer(tokenizer_dir: Path):
    """sentencepiece when the directory has tokenizer.model (exact reference ids), else the HF tokenizer."""
    if (tokenizer_dir / "tokenizer.model").is_file():
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    from llm.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def tokenizer_info(tokenizer_dir: str | Path) -> tuple[int, int | None, int | None]:
    """(vocab size, bos id, eos id) of a tokenizer directory."""
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {tokenizer_dir} not found; train one with `python -m llm.data.tokenizer train`"
        )
    tok = _open_tokenizer(tokenizer_dir)
    if hasattr(tok, "encode_as_ids"):
        bos, eos = tok.bos_id(), tok.eos_id()
        return tok.get_piece_size(), (bos if bos >= 0 else None), (eos if eos >= 0 else None)
    return len(tok), tok.bos_token_id, tok.eos_token_id
