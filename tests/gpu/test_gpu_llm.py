"""Both tiny LLMs on the GPU through launch/pretrain_llama.sh (deepspeed launcher, 1 rank, bf16, ZeRO-1): the loss
falls with each attention kernel, a checkpoint saved on the GPU resumes bitwise, and the export reloads through
transformers in a fresh process with the training model's logits. Mirrors tests/test_trainer_resume.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from runtime.checkpoint import complete_checkpoints, tag_for
from tests.gpu.conftest import ITERS, SAVE
from tests.gpu.target import TARGET, attention_param, gpu, launch_llm, needs_device, subprocess_env
from tests.trainer_utils import losses_by_iteration, train_records

pytestmark = [gpu, needs_device]

PRESETS = {"llama": "llama-tiny", "parameternet": "parameternet-llama-tiny"}


@pytest.mark.parametrize("attn", [attention_param("sdpa"), attention_param("flash_attention_2")])
@pytest.mark.parametrize("model", ["llama", "parameternet"])
def test_bf16_training_on_the_device_lowers_the_loss(trained_llm, model: str, attn: str) -> None:
    run = trained_llm(model, attn)
    records = train_records(run)
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    assert not any(r["skipped"] for r in records), records
    # The trainer reports GPU memory only when its engine is on CUDA (host RSS otherwise); on CUDA DeepSpeed's
    # process group is NCCL, so every collective of the step ran on it.
    assert ("mem_alloc_gib" in records[-1]) == (TARGET.device == "cuda")
    first = sum(r["lm_loss"] for r in records[:2]) / 2
    last = sum(r["lm_loss"] for r in records[-2:]) / 2
    assert last < first - 0.3, [round(r["lm_loss"], 3) for r in records]
    if model == "parameternet":
        assert all("aux_loss" in r and "moe/layers.0.down_proj/max_share" in r for r in records)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == PRESETS[model] and summary["world_size"] == 1
    assert [it for it, _ in complete_checkpoints(run / "checkpoints")] == [SAVE, ITERS]


def test_checkpoint_saved_on_the_device_resumes_bitwise(trained_llm, tmp_path) -> None:
    """The straight run without its last checkpoint resumes from iteration SAVE and re-runs SAVE+1..ITERS with the
    same losses, bit for bit: weights, fp32 master weights, Adam state, LR schedule and data position restored.
    ParameterNet, whose MoE layers add routing state to the step (the vanilla run's resume is the same code path;
    one run of it is left out to keep the GPU suite within its time)."""
    model = "parameternet"
    straight = trained_llm(model, "sdpa")
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "checkpoints" / tag_for(ITERS))
    shutil.rmtree(out / "hf")
    result = launch_llm(
        model,
        out,
        "--attn_implementation",
        "sdpa",
        "--train_iters",
        str(ITERS),
        "--save_interval",
        str(SAVE),
        "--resume",
        "auto",
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"resumed from iteration {SAVE}" in result.stdout
    resumed, reference = losses_by_iteration(out), losses_by_iteration(straight)
    rerun = range(SAVE + 1, ITERS + 1)
    assert [resumed[i] for i in rerun] == [reference[i] for i in rerun]
    assert [it for it, _ in complete_checkpoints(out / "checkpoints")] == [SAVE, ITERS]


# A fresh process loads each exported directory through transformers alone (trust_remote_code for ParameterNet) on
# the device, in fp32 and in bf16, and prints the last position's logits of the same input.
FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM
device, x = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
out = {}
for path in sys.argv[3:]:
    row = {}
    for dtype in ("float32", "bfloat16"):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=getattr(torch, dtype))
        model = model.to(device).eval()
        with torch.no_grad():
            logits = model(input_ids=x.to(device)).logits[0, -1]
        row[dtype] = {"cls": type(model).__name__, "dtype": str(logits.dtype), "device": logits.device.type,
                      "logits": logits.float().cpu().tolist()}
    out[path] = row
print(json.dumps(out))
"""


def test_export_reloads_through_transformers_on_the_device(trained_llm, tmp_path) -> None:
    from safetensors.torch import load_file

    from llm.model import build_model, load_model_config

    device = torch.device(TARGET.device)
    x = torch.randint(3, 8000, (1, 12), generator=torch.Generator().manual_seed(0))
    exported, expected = {}, {}
    for model in PRESETS:
        run = trained_llm(model, "sdpa")
        out = tmp_path / model
        proc = subprocess.run(
            [sys.executable, "-m", "llm.export", str(run), str(out)],
            capture_output=True,
            text=True,
            timeout=600,
            env=subprocess_env(),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "tokenizer.json").is_file()
        weights = load_file(run / "checkpoints" / tag_for(ITERS) / "model.safetensors")
        assert load_file(out / "model.safetensors").keys() == weights.keys()
        # The training model, rebuilt from the final checkpoint's gathered weights, on the device in fp32.
        reference = build_model(load_model_config(PRESETS[model], **TARGET.model_overrides())).to(device).eval()
        reference.load_state_dict(weights)
        with torch.no_grad():
            expected[model] = reference(input_ids=x.to(device)).logits[0, -1].float().cpu()
        exported[model] = out

    proc = subprocess.run(
        [sys.executable, "-c", FRESH, TARGET.device, json.dumps(x.tolist()), *map(str, exported.values())],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    classes = {"llama": "LlamaForCausalLM", "parameternet": "ParameterNetLlamaForCausalLM"}
    for model, out in exported.items():
        fp32, bf16 = got[str(out)]["float32"], got[str(out)]["bfloat16"]
        assert fp32["cls"] == bf16["cls"] == classes[model]
        assert fp32["device"] == bf16["device"] == device.type and bf16["dtype"] == "torch.bfloat16"
        torch.testing.assert_close(torch.tensor(fp32["logits"]), expected[model], atol=1e-4, rtol=1e-4)
        # bf16 inference: rounding noise only (a wrong weight or a broken kernel decorrelates the logits).
        similarity = torch.nn.functional.cosine_similarity(torch.tensor(bf16["logits"]), expected[model], dim=0)
        assert similarity > 0.99, (model, float(similarity))
