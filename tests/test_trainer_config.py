"""Training config, ds_config completion, LR schedule, SLURM rank variables, and bad input refused before any damage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llm.train.config import CONFIG_DIR, TrainConfig, load_config
from llm.train.ds_config import complete_ds_config
from llm.train.optim import lr_at
from llm.train.slurm import expand_nodelist, node_env, rank_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_yaml_preset_mirrors_the_cli_fields(preset):
    import yaml

    keys = set(yaml.safe_load((CONFIG_DIR / f"{preset}.yaml").read_text()))
    assert keys <= set(TrainConfig.__dataclass_fields__), keys - set(TrainConfig.__dataclass_fields__)
    cfg = load_config(preset)
    assert cfg.resolved_train_iters() >= 1


def test_cli_overrides_win_and_are_typed():
    cfg = load_config("tiny", cli_overrides=["--lr", "3e-4", "--zero_stage", "2", "--activation_checkpointing",
                                             "true", "--data_path", "0.3 a 0.7 b", "--train_tokens", "1e6",
                                             "--train_iters", "none", "--model_overrides", '{"num_experts": 4}'])
    assert (cfg.lr, cfg.zero_stage, cfg.activation_checkpointing) == (3e-4, 2, True)
    assert cfg.data_path == ["0.3", "a", "0.7", "b"] and cfg.model_overrides == {"num_experts": 4}
    assert cfg.train_iters is None and cfg.resolved_train_iters() == 245  # ceil(1e6 / (16 * 256))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--learning_rate", "1"], "unknown config key 'learning_rate'"),
        (["--train_iters", "ten"], "--train_iters 'ten': expected int"),
        (["--precision", "fp8"], "precision='fp8'"),
        (["--zero_stage", "5"], "zero_stage=5"),
        (["--min_lr", "1", "--lr", "0.1"], "min_lr=1.0"),
        (["--train_tokens", "100", "--train_iters", "3"], "train_iters=3 and train_tokens=100"),
        (["--expert_parallel_size", "2", "--zero_stage", "3"], "expert_parallel_size=2 with zero_stage=3"),
    ],
)
def test_bad_config_values_are_refused_with_the_field(args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("tiny", cli_overrides=args)


def test_yaml_with_wrong_type_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train_iters: 10\nmicro_batch_size: '8'\n")
    with pytest.raises(ValueError, match="micro_batch_size='8': expected an integer"):
        load_config(path)


def test_cli_unknown_key_exits_nonzero_with_message():
    proc = subprocess.run([sys.executable, "-m", "llm.pretrain", "--config", "tiny", "--warmup", "3"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'warmup'" in proc.stderr and "warmup_iters" in proc.stderr


def test_ds_config_is_completed_from_the_training_config_and_refuses_duplicates():
    cfg = complete_ds_config("zero2", micro_batch_size=4, global_batch_size=32, data_parallel_size=2,
                             precision="bf16", gradient_clipping=0.5, optimizer={"type": "AdamW", "params": {}})
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        32, 4, 4)
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="global_batch_size=30 is not divisible"):
        complete_ds_config("zero1", micro_batch_size=4, global_batch_size=30, data_parallel_size=2)
    with pytest.raises(ValueError, match="train_batch_size"):
        complete_ds_config({"train_batch_size": 8}, micro_batch_size=4, global_batch_size=8, data_parallel_size=1)
    for name in ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"):
        assert complete_ds_config(name, micro_batch_size=1, global_batch_size=1, data_parallel_size=1)


def test_lr_schedule_warmup_cosine_linear_constant():
    cfg = load_config("tiny", cli_overrides=["--train_iters", "110", "--warmup_iters", "10", "--lr", "1.0",
                                             "--min_lr", "0.1"])
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # cosine midpoint between lr and min_lr
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    cfg.lr_decay_style = "linear"
    assert lr_at(35, cfg) == pytest.approx(0.775)
    cfg.lr_decay_style = "constant"
    assert lr_at(100, cfg) == 1.0


def test_a_token_budget_on_the_command_line_replaces_the_presets_iterations():
    cfg = load_config("tiny", cli_overrides=["--train_tokens", "8192"])  # tiny.yaml sets train_iters: 60
    assert (cfg.train_iters, cfg.train_tokens, cfg.resolved_train_iters()) == (None, 8192, 2)
    with pytest.raises(ValueError, match="both set; keep one"):  # both in one layer: ambiguous, refused
        load_config("tiny", cli_overrides=["--train_tokens", "8192", "--train_iters", "3"])


def test_data_path_takes_megatrons_several_word_form_on_the_cli_and_in_yaml(tmp_path):
    def data_path(*args: str) -> list[str]:
        return load_config("tiny", cli_overrides=list(args)).data_path

    assert data_path("--data_path", "0.7", "shards/a", "0.3", "shards/b", "--lr", "1e-3") == [
        "0.7", "shards/a", "0.3", "shards/b"]
    assert data_path("--data_path", "shards/corpus") == ["shards/corpus"]
    assert data_path("--data_path", "1.0 shards/corpus", "--seed", "3") == ["1.0", "shards/corpus"]  # quoted form
    assert data_path("--data_path=1.0 shards/corpus") == ["1.0", "shards/corpus"]
    with pytest.raises(ValueError, match="unexpected argument 'stray'"):  # only list fields take several words
        load_config("tiny", cli_overrides=["--lr", "1e-3", "stray"])
    for value in ('"0.7 a 0.3 b"', "[0.7, a, 0.3, b]"):
        (tmp_path / "c.yaml").write_text(f"train_iters: 1\ndata_path: {value}\n")
        assert load_config(tmp_path / "c.yaml").data_path == ["0.7", "a", "0.3", "b"]


def test_slurm_nodelist_and_rank_variables_of_a_task_per_rank_step():
    assert expand_nodelist("gpu[01-03,07],cpu9") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu9"]
    step = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
            "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NODELIST": "node[07-10]"}
    assert rank_env(step) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node07",
                              "MASTER_PORT": "24242"}
    assert rank_env({**step, "RANK": "0"}) == {}  # a launcher set the ranks already
    # One launcher per node (launch/common.sh): the same rendezvous, node rank from SLURM_NODEID.
    per_node = {**step, "SLURM_STEP_NUM_NODES": "4", "SLURM_NODEID": "2"}
    assert node_env(per_node) == {"NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "node07", "MASTER_PORT": "24242"}
    assert node_env({**per_node, "NNODES": "1"}) == {} and node_env({**per_node, "SLURM_STEP_NUM_NODES": "1"}) == {}
    # The batch script and salloc shells are not job steps: their SLURM_NTASKS describe the allocation.
    assert rank_env({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}) == {}


BAD_INPUTS = r"""
import json, os, sys
from pathlib import Path
from llm.train.config import load_config
from llm.train.trainer import Trainer, TrainingError
base = ["--train_iters", "2", "--seq_len", "32", "--micro_batch_size", "2", "--global_batch_size", "4",
        "--progress_bar", "false", "--output_dir"]
cases = {
    "indivisible": ["--global_batch_size", "6", "--micro_batch_size", "4"],
    "missing_data": ["--data_path", "/nonexistent/corpus", "--tokenizer", "/nonexistent/tok"],
    "vocab": ["--model_overrides", '{"vocab_size": 1000}'],
    "existing_run": [],
}
results = {}
for name, extra in cases.items():
    out = sys.argv[2] if name == "existing_run" else str(Path(sys.argv[1]) / name)
    try:
        Trainer(load_config("tiny", cli_overrides=base + [out] + extra))
        results[name] = "no error"
    except (TrainingError, ValueError) as err:
        results[name] = str(err)
print(json.dumps(results))
"""


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path):
    # A directory holding another run's checkpoint: refused without --resume, and left untouched.
    existing = tmp_path / "existing"
    ckpt = existing / "checkpoints" / "iter_0000005"
    ckpt.mkdir(parents=True)
    (ckpt / "complete.json").write_text(json.dumps({"iteration": 5, "files": {}}))
    (existing / "metrics.jsonl").write_text('{"kind": "train", "iteration": 5}\n')
    before = {p: p.read_bytes() for p in existing.rglob("*") if p.is_file()}

    proc = subprocess.run([sys.executable, "-c", BAD_INPUTS, str(tmp_path / "runs"), str(existing)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "global_batch_size=6 is not divisible by micro_batch_size x data-parallel ranks = 4 x 1" in results[
        "indivisible"]
    assert "/nonexistent/corpus" in results["missing_data"] and "llm.data.prepare" in results["missing_data"]
    assert "8000 tokens" in results["vocab"] and "vocab_size=1000" in results["vocab"]
    assert "already holds checkpoints" in results["existing_run"] and "--resume auto" in results["existing_run"]
    assert {p: p.read_bytes() for p in existing.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))
