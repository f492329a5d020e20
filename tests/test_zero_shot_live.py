"""--eval_tasks: lm-evaluation-harness on the live model at every validation, under expert parallelism (2 ranks,
EP 2, ZeRO-2) and under ZeRO-3 (every rank evaluates: the forwards are collectives there). The accuracies logged at the
last iteration are those of the exported model evaluated afterwards by evals.zero_shot on the same documents."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.trainer_utils import REPO, launch, metric_records

pytestmark = pytest.mark.distributed
TASKS, LIMIT = "arc_easy,piqa", 6


@pytest.mark.parametrize("layout", [["--zero_stage", "2", "--expert_parallel_size", "2"], ["--zero_stage", "3"]])
def test_live_accuracy_is_the_exported_models(layout, tmp_path):
    out = tmp_path / "run"
    flags = ["--train_iters", "2", "--eval_interval", "1", "--eval_tasks", TASKS, "--eval_limit", str(LIMIT)]
    result = launch("parameternet", out, *flags, *layout)
    assert result.returncode == 0, result.stdout[-4000:]
    live = [r for r in metric_records(out) if r["kind"] == "zero_shot"]
    assert [r["iteration"] for r in live] == [1, 2] and [r["tokens"] for r in live] == [256, 512]
    assert all(set(r) == {"kind", "iteration", "tokens", "arc_easy", "piqa"} for r in live)
    assert "[zero-shot] iteration 2 (6 per task): arc_easy" in result.stdout

    evaluated = subprocess.run(
        [sys.executable, "-m", "evals.zero_shot", "--model", str(out), "--tasks", TASKS, "--offline"]
        + ["--limit", str(LIMIT), "--output_dir", str(tmp_path / "eval")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    exported = {task: values["acc_norm,none"] for task, values in results.items()}
    assert exported == {"arc_easy_offline": live[-1]["arc_easy"], "piqa_offline": live[-1]["piqa"]}


def test_unknown_eval_task_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    result = launch("parameternet", out, "--train_iters", "2", "--eval_tasks", "arc_easy,no_such_task", nproc=1)
    assert result.returncode != 0
    assert "eval_tasks='arc_easy,no_such_task'" in result.stdout and "no_such_task" in result.stdout
    assert not (out / "metrics.jsonl").exists()
