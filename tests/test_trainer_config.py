"""Training config, ds_config completion, LR schedule, SLURM rank variables, and bad input refused before any damage."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from llm.model.presets import load_model_config
from llm.pretrain import main
from llm.train.config import (
    CONFIG_DIR,
    ENGINE,
    FIELDS,
    FLOAT_RANGES,
    INT_MINIMUMS,
    TrainConfig,
    load_config,
    type_of,
    warnings_for,
)
from llm.train.optim import schedule
from runtime.ds_config import complete_ds_config, resolve_ds_config_path
from runtime.errors import first_rank_on_node, print_error
from runtime.slurm import expand_nodelist, node_env, rank_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_yaml_preset_mirrors_the_cli_fields(preset):
    import yaml

    keys = set(yaml.safe_load((CONFIG_DIR / f"{preset}.yaml").read_text()))
    assert keys <= set(TrainConfig.__dataclass_fields__), keys - set(TrainConfig.__dataclass_fields__)
    cfg = load_config(preset)
    assert cfg.resolved_train_iters() >= 1


def test_cli_overrides_win_and_are_typed():
    cfg = load_config(
        "tiny",
        cli_overrides=[
            "--lr",
            "3e-4",
            "--zero_stage",
            "2",
            "--activation_checkpointing",
            "true",
            "--data_path",
            "0.3 a 0.7 b",
            "--train_tokens",
            "1e6",
            "--train_iters",
            "none",
            "--model",
            "parameternet-llama-tiny",
            "--model_overrides",
            '{"num_experts": 4}',
        ],
    )
    assert (cfg.lr, cfg.zero_stage, cfg.activation_checkpointing) == (3e-4, 2, True)
    assert cfg.data_path == ["0.3", "a", "0.7", "b"] and cfg.model_overrides == {"num_experts": 4}
    assert cfg.train_iters is None and cfg.resolved_train_iters() == 245  # ceil(1e6 / (16 * 256))


def test_one_flag_style_dashes_equals_and_boolean_words():
    # The vision trainer reads the same way (runtime.config): underscores canonical, dashes accepted, --key=value.
    cfg = load_config(
        "tiny",
        cli_overrides=[
            "--micro-batch-size",
            "4",
            "--global_batch_size=8",
            "--export=false",
            "--data-path",
            "0.7",
            "a",
            "0.3",
            "b",
            "--tensorboard",
            "no",
        ],
    )
    assert (cfg.micro_batch_size, cfg.global_batch_size, cfg.export, cfg.tensorboard) == (4, 8, False, False)
    assert cfg.data_path == ["0.7", "a", "0.3", "b"]
    with pytest.raises(ValueError, match=re.escape("--export needs a value: --export true or --export false")):
        load_config("tiny", cli_overrides=["--export", "--lr", "1e-3"])
    with pytest.raises(
        ValueError, match=re.escape("unknown config key 'no-export' (booleans take a value: --export false)")
    ):
        load_config("tiny", cli_overrides=["--no-export=1"])


def test_help_lists_every_field_with_its_default_and_comment(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--micro_batch_size INT  (default: 8)\n        samples per rank and forward pass" in out
    assert "--train_iters INT|none  (default: none)" in out and "--data_path WORD [WORD ...]  (default: [])" in out
    assert all(f"--{name} " in out for name in FIELDS)


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


# --- every field has a checked range: one line naming the field, the value and the fix (issue 12, item 9) ----------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "nan"], "lr=nan must be a finite number in (0, inf)"),  # was blamed on min_lr
        (["--lr", "inf"], "lr=inf must be a finite number in (0, inf)"),
        (["--lr", "0"], "lr=0.0 must be a finite number in (0, inf)"),
        (["--adam_eps", "-1"], "adam_eps=-1.0 must be a finite number in (0, inf)"),
        (["--adam_eps", "0"], "adam_eps=0.0 must be a finite number in (0, inf)"),
        (["--grad_clip", "-1"], "grad_clip=-1.0 must be a finite number in [0, inf); the max global gradient norm"),
        (["--grad_clip", "nan"], "grad_clip=nan must be a finite number in [0, inf)"),
        (["--adam_beta1", "1"], "adam_beta1=1.0 must be a finite number in [0, 1)"),
        (["--adam_beta2", "-0.1"], "adam_beta2=-0.1 must be a finite number in [0, 1)"),
        (["--weight_decay", "-0.1"], "weight_decay=-0.1 must be a finite number in [0, inf)"),
        (["--weight_decay", "inf"], "weight_decay=inf must be a finite number in [0, inf)"),
        (["--zero_stage", "4"], "zero_stage=4 is not one of 0, 1, 2, 3; e.g. --zero_stage 1"),
        (["--attn_implementation", "foo"], "attn_implementation='foo' is not one of sdpa, flash_attention_2, eager"),
        (["--lr_decay_style", "poly"], "lr_decay_style='poly' is not one of cosine, linear, constant"),
        (["--micro_batch_size", "3"], "global_batch_size=16 is not a multiple of micro_batch_size=3"),
        (["--train_iters", "2.5"], "--train_iters '2.5': expected int or none, e.g. --train_iters 1000"),
        (["--seq_len", "nan"], "--seq_len 'nan': expected int, e.g. --seq_len 256"),
        (["--train_tokens", "-5"], "train_tokens=-5 must be >= 1"),
        (["--warmup_iters", "-1"], "warmup_iters=-1 must be >= 0 (0 = no warmup)"),
        (["--lr_decay_iters", "0"], "lr_decay_iters=0 must be >= 1"),
        (["--lr_decay_iters", "4", "--warmup_iters", "6"], "lr_decay_iters=4 must be > warmup_iters=6"),
        (["--seed", "-1"], "seed=-1 must be >= 0"),
        (["--seed", str(2**32)], "seed=4294967296 must be at most 2**32 - 1"),
        (["--split", "a,b"], "split='a,b' is not a list of numbers"),
        (["--split", "0,1"], "split='0,1' leaves no documents for training"),
        (["--data_path", "0.5 a b"], "data_path: data path '0.5 a b' must alternate weights and prefixes"),
        (["--data_path", "-1 a"], "data_path: "),
        (["--data_path", "[1, a"], "--data_path '[1, a': not valid JSON"),
        (["--tokenizer", "/nonexistent/tok"], "tokenizer='/nonexistent/tok': no tokenizer.json there"),
        (["--resume", "/nonexistent/ckpt"], "an existing checkpoint directory; use --resume auto to continue"),
        (["--ds_config", "zero9"], "ds_config: 'zero9' is neither a file nor one of ds_configs/"),
        (["--model", "llama-7b"], "model='llama-7b' is neither a preset"),
        (["--expert_parallel_size", "2"], "expert_parallel_size=2 needs a ParameterNet model"),
        (
            ["--model", "parameternet-llama-tiny", "--expert_parallel_size", "3"],
            "expert_parallel_size=3 does not divide num_experts=8",
        ),
        (["--seq_len", "2048"], "seq_len=2048 exceeds the model's max_position_embeddings=1024"),
        (["--output_dir", ""], "output_dir='' is empty"),
        (
            ["--model_overrides", "{num_experts: 4}"],  # the JSON parse error is shown, not just "expected dict"
            "--model_overrides '{num_experts: 4}': not valid JSON (Expecting property name enclosed in double quotes "
            "at column 2)",
        ),
        (["--model_overrides", "[4]"], "--model_overrides '[4]': expected a JSON object, got a JSON list"),
    ],
)
def test_every_field_is_range_checked_with_the_field_value_and_fix(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config("tiny", cli_overrides=args)


def test_every_numeric_field_has_a_checked_range():
    # A new int/float field must get a range (or a choice list) here, or it would take nan, negatives... unchecked.
    numeric = {name for name in FIELDS if {int, float} & {type_of(name), *typing.get_args(type_of(name))}}
    covered = set(INT_MINIMUMS) | set(FLOAT_RANGES) | {"zero_stage", "min_lr"}  # min_lr: within [0, lr]
    assert numeric == covered, numeric ^ covered
    assert {"attn_implementation", "lr_decay_style", "precision", "zero_stage", "corpus"} <= set(ENGINE.choices)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_the_package_is_refused_up_front():
    with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2' needs the flash-attn package"):
        load_config("tiny", cli_overrides=["--attn_implementation", "flash_attention_2"])


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(ValueError, match=re.escape(f"output_dir='{tmp_path}/taken' is an existing file")):
        load_config("tiny", cli_overrides=["--output_dir", str(tmp_path / "taken")])
    with pytest.raises(ValueError, match=re.escape(f"'{tmp_path}/taken' on its path is a file")):
        load_config("tiny", cli_overrides=["--output_dir", str(tmp_path / "taken" / "run")])
    with pytest.raises(ValueError, match="data_cache_dir=.* is an existing file"):
        load_config("tiny", cli_overrides=["--data_cache_dir", str(tmp_path / "taken")])
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "train_iters: 3\nlr: [1, 2\nseed: 1\n",
            "bad.yaml:3:5: not valid YAML (while parsing a flow sequence at line 2",
        ),
        ("train_iters: 3\n\tlr: 1\n", "bad.yaml:2:1: not valid YAML (found character '\\t'"),
        ("- 1\n- 2\n", "bad.yaml: expected a mapping of config keys (`key: value` lines), got list"),
        ("train_iters: 3\nlr: .nan\n", "lr=nan must be a finite number"),
        ("train_iters: 3\nwramup_iters: 3\n", "bad.yaml: unknown config key 'wramup_iters' (did you mean warmup_iters"),
        ("train_iters: 2.5\n", "bad.yaml: train_iters=2.5: expected an integer"),
    ],
)
def test_malformed_yaml_names_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(path)


def test_yaml_that_is_not_text_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"train_iters: 3\nlr: \xff\xfe\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not UTF-8 text")):
        load_config(path)


def test_warmup_longer_than_the_run_is_said_not_refused():
    # Refusing it would break every short smoke run on the tiny preset (warmup 6); a warning is printed at start.
    cfg = load_config("tiny", cli_overrides=["--train_iters", "4"])
    assert warnings_for(cfg) == [
        "warmup_iters=6 > train_iters=4: the learning rate never reaches lr=0.002; lower --warmup_iters to at most 4"
    ]
    assert warnings_for(load_config("tiny")) == []


# --- model_overrides: keys and values checked against the chosen model (issue 12, item 3) ------------------------


@pytest.mark.parametrize(
    "model, overrides, message",
    [
        (
            "parameternet-llama-tiny",
            {"num_expertz": 4},
            "unknown key 'num_expertz' for model='parameternet-llama-tiny' (ParameterNetLlamaConfig); did you mean "
            "'num_experts'?",
        ),
        ("llama-tiny", {"num_expertz": 4}, "did you mean 'num_experts' (ParameterNet models only)?"),
        (
            "llama-tiny",
            {"num_experts": 4},
            "'num_experts' applies only to ParameterNet models, but model='llama-tiny' is a vanilla LLaMA",
        ),
        ("llama-tiny", {"moe_projections": ["up_proj"]}, "'moe_projections' applies only to ParameterNet models"),
        (
            "llama-tiny",
            {"hidden_sise": 64},
            "unknown key 'hidden_sise' for model='llama-tiny' (LlamaConfig); did you mean 'hidden_size'",
        ),
        ("llama-tiny", {"model_type": "parameternet_llama"}, "model_type='parameternet_llama' cannot be overridden"),
        ("llama-tiny", {"return_dict": False}, "unknown key 'return_dict'"),
        ("parameternet-llama-tiny", {"num_experts": 0}, "num_experts=0 must be an integer >= 1"),
        ("parameternet-llama-tiny", {"num_experts": 4.5}, "num_experts=4.5 must be an integer >= 1"),
        ("parameternet-llama-tiny", {"num_experts": "4"}, "num_experts='4' must be an integer >= 1"),
        ("parameternet-llama-tiny", {"num_experts": True}, "num_experts=True must be an integer >= 1"),
        ("parameternet-llama-tiny", {"top_k": 1.0}, "top_k=1.0 must be an integer between 1 and num_experts=8"),
        ("parameternet-llama-tiny", {"capacity_factor": "x"}, "capacity_factor='x' must be a number > 0"),
        ("parameternet-llama-tiny", {"router_aux_loss_coef": float("nan")}, "router_aux_loss_coef=nan must be"),
        ("parameternet-llama-tiny", {"expert_output_bias": "yes"}, "expert_output_bias='yes' must be true or false"),
        ("parameternet-llama-tiny", {"router_bias_update_rate": -1}, "router_bias_update_rate=-1 must be a finite"),
        ("parameternet-llama-tiny", {"moe_projections": 3}, "moe_projections=3 must be a non-empty list"),
        ("llama-tiny", {"hidden_size": 66}, "hidden_size=66 is not a multiple of num_attention_heads=8"),
        ("llama-tiny", {"hidden_size": "64"}, "hidden_size='64' must be an integer >= 1"),
        ("llama-tiny", {"num_attention_heads": 0}, "num_attention_heads=0 must be an integer >= 1"),
        ("llama-tiny", {"num_key_value_heads": 3}, "num_key_value_heads=3 must be an integer dividing"),
        ("llama-tiny", {"vocab_size": 0}, "vocab_size=0 must be an integer >= 1"),
        ("llama-tiny", {"rms_norm_eps": 0}, "rms_norm_eps=0 must be a finite number > 0"),
    ],
)
def test_model_overrides_are_checked_against_the_model_at_config_load(model, overrides, message):
    args = ["--model", model, "--model_overrides", json.dumps(overrides)]
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config("tiny", cli_overrides=args)
    with pytest.raises(ValueError, match=re.escape(message)):  # and where the trainer and export build the model
        load_model_config(model, **overrides)


def test_valid_model_overrides_still_apply():
    config = load_model_config(
        "parameternet-llama-tiny",
        num_experts=4,
        top_k=2,
        capacity_factor=1.25,
        moe_projections=["up_proj", "down_proj"],
        rope_theta=5e5,
        hidden_size=128,
    )
    assert (config.num_experts, config.top_k, config.capacity_factor, config.moe_projections, config.hidden_size) == (
        4,
        2,
        1.25,
        ["up_proj", "down_proj"],
        128,
    )


# --- the CLI: one `error:` line per node, written whole; exit 2; nothing written ---------------------------------


def test_error_lines_are_written_whole_and_config_errors_once_per_node(monkeypatch, capsys):
    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            writes.append("<flush>")

    monkeypatch.setattr(sys, "stderr", Recorder())
    print_error("first part\n  second part")
    assert writes == ["error: first part second part\n", "<flush>"]  # one write of one complete line, then flush

    monkeypatch.undo()
    for local_rank, expected in (("1", ""), ("0", "error: grad_clip=-1.0 must be")):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert main(["--config", "tiny", "--grad_clip", "-1"]) == 2
        assert capsys.readouterr().err.startswith(expected)
    monkeypatch.delenv("LOCAL_RANK")
    assert first_rank_on_node(["--local_rank=1"]) is False and first_rank_on_node([]) is True


E2E_CASES = {
    "malformed_yaml": (["--config", "{tmp}/bad.yaml"], "bad.yaml:3:5: not valid YAML"),
    "output_dir_is_a_file": (["--config", "tiny", "--output_dir", "{tmp}/out/file"], "is an existing file"),
    "negative_grad_clip": (["--config", "tiny", "--grad_clip", "-1", "--output_dir", "{tmp}/out"], "grad_clip=-1.0"),
    "override_typo": (
        [
            "--config",
            "tiny",
            "--model",
            "parameternet-llama-tiny",
            "--model_overrides",
            '{"num_expertz": 4}',
            "--output_dir",
            "{tmp}/out",
        ],
        "unknown key 'num_expertz'",
    ),
}


@pytest.mark.parametrize("case", list(E2E_CASES))
def test_pretrain_cli_refuses_with_one_line_and_exit_2(tmp_path, case):
    args, message = E2E_CASES[case]
    (tmp_path / "bad.yaml").write_text("train_iters: 3\nlr: [1, 2\nseed: 1\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("keep me")
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "llm.pretrain", *argv], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


def test_cli_unknown_key_exits_nonzero_with_message():
    proc = subprocess.run(
        [sys.executable, "-m", "llm.pretrain", "--config", "tiny", "--warmup", "3"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown config key 'warmup'" in proc.stderr and "warmup_iters" in proc.stderr


def test_ds_config_is_completed_from_the_training_config_and_refuses_duplicates():
    cfg = complete_ds_config(
        "zero2",
        micro_batch_size=4,
        global_batch_size=32,
        data_parallel_size=2,
        precision="bf16",
        gradient_clipping=0.5,
        optimizer={"type": "AdamW", "params": {}},
    )
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        32,
        4,
        4,
    )
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="global_batch_size=30 is not divisible"):
        complete_ds_config("zero1", micro_batch_size=4, global_batch_size=30, data_parallel_size=2)
    with pytest.raises(ValueError, match="train_batch_size"):
        complete_ds_config({"train_batch_size": 8}, micro_batch_size=4, global_batch_size=8, data_parallel_size=1)
    for name in ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"):
        assert complete_ds_config(name, micro_batch_size=1, global_batch_size=1, data_parallel_size=1)


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_ds_config_by_name_and_by_its_path_is_the_same_file_in_both_trainers(cwd, tmp_path, monkeypatch):
    """--ds_config zero2 and --ds_config ds_configs/zero2.json (relative to the cwd, or to the repository root from
    anywhere else) name the top-level ds_configs/zero2.json, and both trainers build the same engine config from it."""
    import vision.build
    import vision.config
    from llm.train.build import ds_config as llm_ds_config

    monkeypatch.chdir(REPO if cwd == "repo" else tmp_path)
    forms = ("zero2", "ds_configs/zero2.json")
    assert {resolve_ds_config_path(form).resolve() for form in forms} == {REPO / "ds_configs" / "zero2.json"}
    llm = [
        llm_ds_config(load_config("tiny", cli_overrides=["--ds_config", form, "--zero_stage", "2"]), 1)
        for form in forms
    ]
    assert llm[0] == llm[1] and llm[0]["zero_optimization"]["stage"] == 2
    cfgs = [vision.config.TrainConfig(data_dir="x", ds_config=form, zero_stage=2) for form in forms]
    for cfg in cfgs:
        vision.config.validate(cfg)
    built = [vision.build.ds_config(cfg, 1) for cfg in cfgs]
    assert built[0] == built[1] and built[0]["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match=re.escape("'runtime/ds_configs/zero2.json' is neither a file nor one of")):
        resolve_ds_config_path("runtime/ds_configs/zero2.json")  # the old place is gone, not silently found


def lr_at(step: int, cfg) -> float:
    return schedule(cfg).lr_at(step)


def test_lr_schedule_warmup_cosine_linear_constant():
    cfg = load_config(
        "tiny", cli_overrides=["--train_iters", "110", "--warmup_iters", "10", "--lr", "1.0", "--min_lr", "0.1"]
    )
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # cosine midpoint between lr and min_lr
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    cfg.lr_decay_style = "linear"
    assert lr_at(35, cfg) == pytest.approx(0.775)
    cfg.lr_decay_style = "constant"
    assert lr_at(100, cfg) == 1.0


def test_lr_schedule_warmup_stable_decay():
    cfg = load_config(
        "tiny",
        cli_overrides=["--train_iters", "110", "--warmup_iters", "10", "--lr", "1.0", "--min_lr", "0.1"]
        + ["--lr_decay_style", "wsd", "--wsd_decay_fraction", "0.2"],
    )
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)  # the same warmup
    # Stable at lr until the last ceil(0.2 x 110) = 22 steps, then linear to min_lr at step 110, then min_lr.
    assert [lr_at(s, cfg) for s in (10, 50, 88)] == [1.0, 1.0, 1.0]
    assert lr_at(99, cfg) == pytest.approx(1.0 - 0.9 * 11 / 22)
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    cfg.lr_decay_iters = 60  # the span ends at lr_decay_iters: decay over steps 48-60
    assert lr_at(48, cfg) == 1.0 and lr_at(54, cfg) == pytest.approx(0.55) and lr_at(80, cfg) == pytest.approx(0.1)
    cfg.lr_decay_iters, cfg.wsd_decay_fraction = 100, 0.55  # 0.55 x 100 = 55.00000000000001: 55 steps, not 56
    assert lr_at(45, cfg) == 1.0 and lr_at(46, cfg) < 1.0
    cfg.lr_decay_iters, cfg.wsd_decay_fraction = 60, 1.0  # the whole span decays: linear decay from the end of warmup
    assert lr_at(35, cfg) == pytest.approx(1.0 - 0.9 * 25 / 50)
    for bad in ("0", "1.5", "nan"):
        with pytest.raises(ValueError, match=f"wsd_decay_fraction={bad}"):
            load_config("tiny", cli_overrides=["--wsd_decay_fraction", bad])
    with pytest.raises(ValueError, match="lr_decay_style='wsdd'"):
        load_config("tiny", cli_overrides=["--lr_decay_style", "wsdd"])


def test_a_token_budget_on_the_command_line_replaces_the_presets_iterations():
    cfg = load_config("tiny", cli_overrides=["--train_tokens", "8192"])  # tiny.yaml sets train_iters: 60
    assert (cfg.train_iters, cfg.train_tokens, cfg.resolved_train_iters()) == (None, 8192, 2)
    with pytest.raises(ValueError, match="both set; keep one"):  # both in one layer: ambiguous, refused
        load_config("tiny", cli_overrides=["--train_tokens", "8192", "--train_iters", "3"])


def test_data_path_takes_megatrons_several_word_form_on_the_cli_and_in_yaml(tmp_path):
    def data_path(*args: str) -> list[str]:
        return load_config("tiny", cli_overrides=list(args)).data_path

    assert data_path("--data_path", "0.7", "shards/a", "0.3", "shards/b", "--lr", "1e-3") == [
        "0.7",
        "shards/a",
        "0.3",
        "shards/b",
    ]
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
    step = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_NODELIST": "node[07-10]",
    }
    assert rank_env(step) == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node07",
        "MASTER_PORT": "24242",
    }
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
from llm.data import ensure_default_corpus
from llm.train.config import load_config
from llm.train.trainer import Trainer, TrainingError
base = ["--train_iters", "2", "--seq_len", "32", "--micro_batch_size", "2", "--global_batch_size", "4",
        "--progress_bar", "false", "--output_dir"]
cases = {
    "indivisible": ["--global_batch_size", "6", "--micro_batch_size", "4"],
    "missing_data": ["--data_path", "/nonexistent/corpus", "--tokenizer", str(ensure_default_corpus().tokenizer_dir)],
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

    proc = subprocess.run(
        [sys.executable, "-c", BAD_INPUTS, str(tmp_path / "runs"), str(existing)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "global_batch_size=6 is not a multiple of micro_batch_size=4" in results["indivisible"]
    assert "/nonexistent/corpus" in results["missing_data"] and "llm.data.prepare" in results["missing_data"]
    assert "8000 tokens" in results["vocab"] and "vocab_size=1000" in results["vocab"]
    assert "already holds checkpoints" in results["existing_run"] and "--resume auto" in results["existing_run"]
    assert {p: p.read_bytes() for p in existing.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))
