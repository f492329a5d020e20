"""A non-finite loss skips the update (weights unchanged), is logged, and too many in a row abort the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, torch
from llm.train.config import load_config
from llm.train.trainer import Trainer, TrainingError

class PoisonedTrainer(Trainer):
    # The real engine, optimizer and skip logic; only the loss of chosen iterations is made non-finite.
    poison = set()
    def _forward(self, batch):
        total, lm_loss, out = super()._forward(batch)
        if self.iteration + 1 in self.poison:
            total = total * float("nan")
        return total, lm_loss, out

def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}

from tests.trainer_utils import tiny_args

overrides = tiny_args(global_batch_size=4, warmup_iters=0, eval_interval=None, eval_iters=None, export=False,
                      save_interval=100, model="parameternet-llama-tiny")
result = {}
PoisonedTrainer.poison = {2}
trainer = PoisonedTrainer(load_config("tiny", cli_overrides=overrides + ["--train_iters", "3",
                                                                       "--output_dir", sys.argv[1] + "/a"]))
batches = trainer._batches()
w0 = weights(trainer)
stats = []
for it in range(3):
    stats.append(trainer.train_step(batches)["skipped"])
    trainer.iteration += 1
    result[f"w{it + 1}"] = weights(trainer)
result = {"skipped": stats,
          "changed_1": any(not torch.equal(w0[k], result["w1"][k]) for k in w0),
          "changed_2": any(not torch.equal(result["w1"][k], result["w2"][k]) for k in w0),
          "changed_3": any(not torch.equal(result["w2"][k], result["w3"][k]) for k in w0)}
PoisonedTrainer.poison = {1, 2, 3, 4}
more = ["--train_iters", "6", "--max_nonfinite_steps", "3", "--output_dir", sys.argv[1] + "/b"]
trainer = PoisonedTrainer(load_config("tiny", cli_overrides=overrides + more))
try:
    trainer.train()
    result["abort"] = "no error"
except TrainingError as err:
    result["abort"] = str(err)
result["log"] = [json.loads(l) for l in open(sys.argv[1] + "/b/metrics.jsonl")]
print(json.dumps(result))
"""


def test_nonfinite_loss_skips_update_then_aborts(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["skipped"] == [False, True, False]
    assert result["changed_1"] and not result["changed_2"] and result["changed_3"]
    assert "3 consecutive iterations had a non-finite loss" in result["abort"]
    assert "max_nonfinite_steps=3" in result["abort"]
    assert [r["iteration"] for r in result["log"] if r["kind"] == "skip"] == [1, 2, 3]
