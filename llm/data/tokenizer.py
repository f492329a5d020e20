"""LLaMA-style sentencepiece tokenizers, exported as Hugging Face tokenizer directories.

`python -m llm.data.tokenizer train --input FILES --vocab-size N --out DIR [--overwrite]`

What the directory holds and why:
- `tokenizer.model`: the sentencepiece model (BPE, byte fallback, ids unk 0 / bos 1 / eos 2). It is the reference:
  `prepare` tokenizes corpora with it.
- `tokenizer.json` + `tokenizer_config.json`: the same tokenizer for `AutoTokenizer.from_pretrained(DIR)` (lm-eval,
  transformers), offline. It reproduces sentencepiece's ids exactly: normalizer "prepend U+2581, spaces -> U+2581"
  and no pre-tokenizer, as LLaMA's original conversion did. (transformers 5's `LlamaTokenizer` class rebuilds a
  Metaspace pre-tokenizer that drops the dummy prefix before a leading space, so " x" would encode differently;
  the config therefore names the generic `TokenizersBackend` class, which loads tokenizer.json verbatim.)
- Special tokens: BOS is added by the tokenizer (`tok(text)` starts with id 1) and `prepare` writes every document
  as `<s> text </s>`, so what evaluation sees matches what training saw. There is no pad token in LLaMA; we set
  pad = `<unk>` (id 0): byte fallback means sentencepiece never emits `<unk>` for real text, so padding can never be
  confused with data (pad = eos would be, since every document ends with eos). Padding side is left, what batched
  generation with a causal LM needs.
- `parameternet_tokenizer.json`: vocabulary size, inputs, ids; it also proves the directory is ours, so `--overwrite`
  may replace it (never a directory with other files, see runtime.fsutil.claim_output).

Vocabulary size: byte fallback reserves 259 ids (3 specials + 256 bytes) and every distinct character that
`character_coverage` keeps needs one more, so the least size depends on the text: 327 for the Shakespeare corpus
(68 characters), far more for Chinese or Japanese text. A model wants merges on top: thousands (8000 for the tiny
presets, 32000 for LLaMA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from runtime.errors import print_error
from runtime.fsutil import claim_output, publish_dir, temp_dir_for

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
RESERVED_IDS = 3 + 256  # 3 special ids + 256 byte-fallback ids are always in the vocabulary
# The least size that trained on the Shakespeare corpus (68 distinct characters, each needs an id too); real text
# in a Latin script needs about as many, so the up-front advice names it. sentencepiece's own count for the given
# text is reported when it refuses (see _vocab_error).
SHAKESPEARE_MIN_VOCAB_SIZE = 327
PLAIN_TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
META_FILE = "parameternet_tokenizer.json"
TOOL = "llm.data.tokenizer"
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
_TOO_LARGE = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


def _check_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    if not inputs:
        raise ValueError("no input files given; pass --input FILE [FILE ...]")
    paths = [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"tokenizer input file(s) not found: {', '.join(missing)}")
    return paths


def _text_lines(paths: list[Path], text_key: str) -> Iterator[str]:
    """Lines of every document of non-plain-text inputs (JSONL, parquet, ...), read through `datasets`."""
    from llm.data.documents import load_corpus

    corpus = load_corpus(paths, text_key=text_key)
    for row in corpus:
        for line in row[text_key].split("\n"):
            if line.strip():
                yield line


def train_tokenizer(
    inputs: Sequence[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    *,
    model_type: str = "bpe",
    text_key: str = "text",
    character_coverage: float = 0.99995,
    input_sentence_size: int = 10_000_000,
    num_threads: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Train a LLaMA-style sentencepiece tokenizer on `inputs` and write an HF tokenizer directory to `out_dir`.

    Plain-text files are read line by line by sentencepiece; JSONL/parquet/arrow inputs through `datasets`
    (field `text_key`). The directory is built under a temporary name and renamed when complete. An existing
    non-empty `out_dir` is refused, except an earlier tokenizer of ours with `overwrite=True`.
    """
    import sentencepiece as spm

    paths = _check_inputs(inputs)
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r} is not supported; use 'bpe' (LLaMA) or 'unigram'")
    if vocab_size <= RESERVED_IDS:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte fallback reserves {RESERVED_IDS} ids (3 specials + 256 "
            f"bytes) and every distinct character of the text needs one more ({SHAKESPEARE_MIN_VOCAB_SIZE} in all for "
            f"English text such as Shakespeare); use a few thousand (8000 for the tiny presets, LLaMA uses 32000)"
        )
    plain = all(p.is_file() and p.suffix.lower() in PLAIN_TEXT_SUFFIXES for p in paths)
    if plain and sum(p.stat().st_size for p in paths) == 0:
        raise ValueError(f"tokenizer inputs are empty: {', '.join(map(str, paths))}")

    out_dir = Path(out_dir)
    claim_output(out_dir, overwrite=overwrite, flag="--out", tool=TOOL, proof=META_FILE)
    tmp_dir = temp_dir_for(out_dir)
    try:
        options = dict(
            model_prefix=str(tmp_dir / "tokenizer"),
            vocab_size=vocab_size,
            model_type=model_type,
            # LLaMA's settings: bytes for unseen characters, digits split, whitespace kept verbatim.
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 14,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
        spm.set_random_generator_seed(seed)
        try:
            if plain:
                spm.SentencePieceTrainer.train(input=[str(p) for p in paths], **options)
            else:
                lines = _text_lines(paths, text_key)
                first = next(lines, None)
                if first is None:
                    raise ValueError(f"tokenizer inputs hold no text in field {text_key!r}: {paths}")
                spm.SentencePieceTrainer.train(sentence_iterator=_chain(first, lines), **options)
        except RuntimeError as err:
            raise _vocab_error(err, paths) from err
        (tmp_dir / "tokenizer.vocab").unlink(missing_ok=True)  # a human-readable copy of the vocabulary; unused
        export_hf_tokenizer(tmp_dir)
        meta = {
            "written_by": TOOL,
            "vocab_size": vocab_size,
            "model_type": model_type,
            "inputs": [str(p) for p in paths],
            "special_ids": {"unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID, "pad": UNK_ID},
            "sentencepiece_version": spm.__version__,
            "files": sorted(p.name for p in tmp_dir.iterdir()),
        }
        (tmp_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        publish_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _vocab_error(err: RuntimeError, paths: list[Path]) -> ValueError:
    """sentencepiece's refusals, as advice in our terms (its own text names internal fields)."""
    inputs = ", ".join(map(str, paths))
    small = _TOO_SMALL.search(str(err))
    if small:
        given, needed = small.groups()
        return ValueError(
            f"vocab_size={given} is too small for {inputs}: {RESERVED_IDS} ids are reserved (3 specials + 256 bytes) "
            f"and each of its {int(needed) - RESERVED_IDS} distinct characters needs one; use at least {needed} "
            f"(a few thousand for a useful model: 8000 for the tiny presets, LLaMA uses 32000)"
        )
    large = _TOO_LARGE.search(str(err))
    if large:
        given, most = large.groups()
        return ValueError(
            f"vocab_size={given} is too large for {inputs}: this much text allows a vocabulary size of at "
            f"most {most}; use --vocab-size {most} or less, or give more text"
        )
    return ValueError(f"sentencepiece could not train on {inputs}: {err}")


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def export_hf_tokenizer(tokenizer_dir: str | Path) -> None:
    """Write tokenizer.json + tokenizer_config.json next to `tokenizer_dir/tokenizer.model` (ids equal)."""
    from tokenizers import decoders, normalizers, processors
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{tokenizer_dir / 'tokenizer.model'} not found: train a tokenizer first")
    # LlamaTokenizer converts the sentencepiece vocabulary and merges; we then replace its text pipeline with the
    # one that matches sentencepiece exactly (see the module docstring).
    backend = LlamaTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True).backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (UNK, BOS, EOS)}
    if ids != {UNK: UNK_ID, BOS: BOS_ID, EOS: EOS_ID}:
        raise ValueError(f"{tokenizer_dir}/tokenizer.model has special ids {ids}; expected unk 0, bos 1, eos 2")
    tokenizer.save_pretrained(str(tokenizer_dir))


def load_tokenizer(tokenizer_dir: str | Path):
    """The HF tokenizer of `tokenizer_dir`, loaded from local files only (never the hub)."""
    from transformers import AutoTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {tokenizer_dir}: train one with `python -m llm.data.tokenizer train --input FILES "
            f"--vocab-size N --out {tokenizer_dir}`"
        )
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.data.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a sentencepiece BPE and write an HF tokenizer directory")
    train.add_argument("--input", nargs="+", required=True, help="text files (one sentence per line) or JSONL")
    train.add_argument("--vocab-size", type=int, required=True, help="e.g. 8000 (tiny presets) or 32000 (1B)")
    train.add_argument("--out", required=True, help="output directory (must not exist yet, or be empty)")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it holds an earlier tokenizer of ours (never anything else)",
    )
    train.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    train.add_argument("--text-key", default="text", help="field holding the text in JSONL/parquet inputs")
    train.add_argument("--input-sentence-size", type=int, default=10_000_000, help="lines sampled for training")
    args = parser.parse_args(argv)
    try:
        out = train_tokenizer(
            args.input,
            args.vocab_size,
            args.out,
            model_type=args.model_type,
            text_key=args.text_key,
            input_sentence_size=args.input_sentence_size,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError) as err:
        print_error(str(err))
        return 2
    tokenizer = load_tokenizer(out)
    print(json.dumps({"tokenizer_dir": str(out), "vocab_size": len(tokenizer)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
