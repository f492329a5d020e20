"""Vision training config, presets, bad-input errors and the deterministic data order (no process groups here)."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from runtime.config import REFUSE
from vision.build import param_groups
from vision.config import (
    ENGINE,
    FIELDS,
    FLOAT_RANGES,
    INT_MINIMUMS,
    PRESET_DIR,
    RESUME_POLICY,
    TrainConfig,
    load_config,
    parse_config,
    validate,
)
from vision.data import SeededTransformDataset, TrainBatchSampler, build_datasets, build_transforms
from vision.train import main, train

_RANK_BEFORE = os.environ.get("RANK")
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Small ops on a shared 2-core machine: a second OpenMP thread that gets descheduled stalls every op (measured
    # 40x slower under load), while one thread is as fast as two on these shapes. Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tree(root: Path, classes: dict[str, int], split: str = "train") -> Path:
    for name, count in classes.items():
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8), 10 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _folder_cfg(root: Path, **overrides: object) -> TrainConfig:
    return dataclasses.replace(
        TrainConfig(dataset="folder", data_dir=str(root), img_size=32, micro_batch_size=4, global_batch_size=4),
        **overrides,
    )


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_are_valid_and_use_only_cli_fields(preset: str) -> None:
    values = ENGINE.read_preset(preset)
    assert set(values) <= set(FIELDS), set(values) - set(FIELDS)
    cfg = load_config(preset)
    # Every preset key is a flag: the preset equals the same values given on the command line.
    argv = []
    for key in values:
        value = getattr(cfg, key)
        words = ["none"] if value is None else [str(v) for v in value] if isinstance(value, list) else [str(value)]
        argv += [f"--{key}", *words]
    assert parse_config(argv) == cfg


def test_every_field_is_a_flag_and_flags_override_the_preset() -> None:
    # One flag style with the LLM trainer: --key value or --key=value, dashes or underscores, booleans with a value.
    cfg = parse_config(
        [
            "--config",
            "fashion_mnist_tiny",
            "--model",
            "ghostnet_tiny",
            "--lr",
            "1e-4",
            "--scale",
            "0.5",
            "1.0",
            "--progress-bar",
            "false",
            "--layer_decay=0.7",
            "--ema",
            "true",
            "--local_rank=1",
        ]
    )
    got = (cfg.model, cfg.lr, cfg.scale, cfg.progress_bar, cfg.layer_decay, cfg.ema)
    assert got == ("ghostnet_tiny", 1e-4, [0.5, 1.0], False, 0.7, True)
    assert cfg.img_size == 32  # from the preset
    assert parse_config(["--config", "parameternet_600m_in1k_ft", "--layer-decay", "none"]).layer_decay is None
    usage = ENGINE.usage("vision.train")
    for name in FIELDS:  # every field is documented in --help, with its default
        assert f"--{name} " in usage


def test_every_numeric_field_has_a_checked_range_and_every_field_a_resume_policy() -> None:
    numeric = {name for name, shape in ENGINE.shapes.items() if shape.origin in (int, float)}
    covered = set(INT_MINIMUMS) | set(FLOAT_RANGES) | {"in_chans", "zero_stage", "min_lr"}  # choices; min_lr in [0, lr]
    assert numeric == covered, numeric ^ covered
    assert set(RESUME_POLICY) == set(FIELDS)
    old_must_match = (
        "model",
        "num_experts",
        "num_classes",
        "in_chans",
        "img_size",
        "dataset",
        "train_subset",
        "epochs",
        "global_batch_size",
        "micro_batch_size",
        "seed",
        "precision",
        "ema",
    )
    assert all(RESUME_POLICY[name][0] == REFUSE for name in old_must_match)


def test_the_old_vision_flags_are_answered_with_their_new_names() -> None:
    for old, new in (
        ("--max-steps", "train_iters"),
        ("--clip_grad", "grad_clip"),
        ("--log-every", "log_interval"),
        ("--betas", "adam_beta1 and adam_beta2"),
        ("--min-lr-ratio", "min_lr"),
    ):
        with pytest.raises(ValueError, match=re.escape(f"unknown config key '{old[2:]}' (renamed: use {new}")):
            parse_config([old, "1"])
    with pytest.raises(
        ValueError,
        match=re.escape("unknown config key 'no-progress-bar' (booleans take a value: --progress_bar false)"),
    ):
        parse_config(["--no-progress-bar=1"])
    with pytest.raises(ValueError, match=re.escape("--ema needs a value: --ema true or --ema false")):
        parse_config(["--ema", "--lr", "1e-3"])


def test_fine_tune_preset_has_the_papers_recipe_fields() -> None:
    pre = ENGINE.load("parameternet_600m_in22k")
    ft = ENGINE.load("parameternet_600m_in1k_ft")
    assert pre.model == ft.model == "parameternet_600m"
    assert ft.layer_decay == 0.5 and ft.re_prob == 0.0 and pre.layer_decay is None
    assert ft.init_from == pre.output_dir and ft.num_classes == 1000


def test_layer_decay_groups_scale_the_lr_by_depth() -> None:
    model = timm.create_model("parameternet_tiny", num_classes=3)
    cfg = TrainConfig(lr=1e-3, layer_decay=0.5, weight_decay=0.05)
    groups = param_groups(model, cfg)
    by_param = {id(p): g for g in groups for p in g["params"]}
    stem, head = by_param[id(model.conv_stem.cond_conv.weight)], by_param[id(model.classifier.weight)]
    assert head["lr"] == pytest.approx(1e-3)
    assert stem["lr"] == pytest.approx(1e-3 * 0.5**11)
    assert by_param[id(model.bn1.weight)]["weight_decay"] == 0.0  # norms: no weight decay
    assert stem["weight_decay"] == 0.05


# --- bad input: each refused before any data loading or process group, with the field, the value and a fix -----------


def test_missing_dataset_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data_dir=.*does not exist"):
        train(_folder_cfg(tmp_path / "nope"))
    _tree(tmp_path, {"a": 2, "b": 2})  # train/ but no validation/
    with pytest.raises(FileNotFoundError, match=r"val_split='validation'.*tried"):
        train(_folder_cfg(tmp_path))


def test_empty_class_folder(tmp_path: Path) -> None:
    _tree(tmp_path, {"a": 2, "b": 0, "c": 2})
    _tree(tmp_path, {"a": 1, "c": 1}, split="val")
    with pytest.raises(ValueError, match=r"class folder 'b' has no images"):
        train(_folder_cfg(tmp_path))


def test_unknown_model_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model='parameternet_9000m' is not a registered timm model; ours: "):
        train(_folder_cfg(tmp_path, model="parameternet_9000m"))


def test_image_size_below_the_minimum(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"img_size=28 is below the minimum 32 of parameternet_tiny"):
        train(_folder_cfg(tmp_path, img_size=28))


def test_other_bad_fields_are_named() -> None:
    with pytest.raises(ValueError, match=r"overrides: unknown config key 'learning_rate'; known keys: model, .*, lr, "):
        ENGINE.load(overrides={"learning_rate": 1.0})
    with pytest.raises(ValueError, match=r"overrides: epochs='ten': expected an integer, e.g. --epochs 90"):
        ENGINE.load(overrides={"epochs": "ten"})
    with pytest.raises(ValueError, match=re.escape("--scale '0.5 x': expected a list of numbers, e.g. --scale 0.08 1")):
        parse_config(["--scale", "0.5", "x"])
    with pytest.raises(ValueError, match=r"micro_batch_size=5 is odd"):
        validate(TrainConfig(data_dir="x", micro_batch_size=5))
    with pytest.raises(ValueError, match=r"zero_stage=3"):
        validate(TrainConfig(data_dir="x", zero_stage=3))
    with pytest.raises(ValueError, match=r"config='nope': no such file, nor a preset in vision/configs/ \(fashion"):
        ENGINE.read_preset("nope")


def test_cli_exits_nonzero_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing"
    assert main(["--dataset", "folder", "--data_dir", str(missing), "--img-size", "32"]) == 2
    err = capsys.readouterr().err
    assert f"vision.train: error: data_dir='{missing}' does not exist" in err
    assert "RANK" not in os.environ or os.environ["RANK"] == _RANK_BEFORE  # refused before any process group


# --- deterministic data --------------------------------------------------------------------------------------------


def _sampler(**kw: int) -> TrainBatchSampler:
    args = dict(seed=3, epoch=1, micro_batch_size=4, world_size=2, rank=0, grad_accum=2, start_step=0)
    args.update(kw)
    return TrainBatchSampler(np.arange(100), **args)  # type: ignore[arg-type]


def test_sample_order_is_a_function_of_seed_epoch_and_step() -> None:
    full = [list(_sampler(rank=r)) for r in range(2)]
    # 100 images, global batch 16 -> 6 steps x 2 micro-steps per rank; every used image once, across ranks.
    assert len(full[0]) == 12 and len(full[1]) == 12
    used = [i for rank in full for batch in rank for i, _ in batch]
    assert len(used) == 96 and len(set(used)) == 96
    # Resuming at step 4 yields exactly the tail of the uninterrupted epoch, augmentation seeds included.
    assert list(_sampler(start_step=4)) == full[0][8:]
    # Another epoch or seed -> another order.
    assert list(_sampler(epoch=2)) != full[0]
    assert list(_sampler(seed=4)) != full[0]
    # Sample identities and their seeds do not depend on the world size (same global batch).
    one_rank = [k for b in _sampler(world_size=1, grad_accum=4) for k in b]
    two_ranks = [k for s in range(6) for a in range(2) for r in range(2) for k in full[r][s * 2 + a]]
    assert sorted(one_rank) == sorted(two_ranks)


def test_augmentation_is_a_function_of_the_sample_seed(tmp_path: Path) -> None:
    _tree(tmp_path, {"a": 3, "b": 3})
    _tree(tmp_path, {"a": 1, "b": 1}, split="validation")
    cfg = _folder_cfg(tmp_path, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    splits = build_datasets(cfg)
    train_tf, _ = build_transforms(cfg, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ds = SeededTransformDataset(splits.train, train_tf, "RGB")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = ds[(0, 7)][0], ds[(0, 7)][0], ds[(0, 8)][0]
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is untouched
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert splits.class_names == ["a", "b"] and splits.num_classes == 2


# --- every field range-checked; CLI errors as one line, exit 2 (issue 12, item 9) -----------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(lr=float("nan")), "lr=nan must be a finite number in (0, inf); the peak AdamW learning rate, e.g. 2e-3"),
        (dict(warmup_epochs=float("inf")), "warmup_epochs=inf must be a finite number in [0, inf)"),
        (dict(grad_clip=float("nan")), "grad_clip=nan must be a finite number in [0, inf)"),
        (dict(mean=[float("nan"), 0.5, 0.5]), "mean=[nan, 0.5, 0.5] must be finite (no nan or inf)"),
        (dict(adam_eps=0.0), "adam_eps=0.0 must be a finite number in (0, inf)"),
        (dict(weight_decay=-0.1), "weight_decay=-0.1 must be a finite number in [0, inf)"),
        (dict(adam_beta2=1.0), "adam_beta2=1.0 must be a finite number in [0, 1)"),
        (dict(min_lr=0.1), "min_lr=0.1 must lie in [0, lr=0.002]"),
        (dict(std=[0.5, 0.0, 0.5]), "std=[0.5, 0.0, 0.5] must hold values > 0"),
        (dict(drop_path_rate=1.5), "drop_path_rate=1.5 must be a finite number in [0, 1]"),
        (dict(crop_pct=0.0), "crop_pct=0.0 must be a finite number in (0, 1]"),
        (dict(color_jitter=-0.1), "color_jitter=-0.1 must be a finite number in [0, inf)"),
        (dict(mixup=-1.0), "mixup=-1.0 must be a finite number in [0, inf)"),
        (dict(interpolation="random"), "interpolation='random' is not one of bicubic, bilinear"),
        (dict(in_chans=2), "in_chans=2 is not one of 1, 3; e.g. --in_chans 3"),
        (dict(train_iters=0), "train_iters=0 must be >= 1 (or none: all epochs)"),
        (dict(seed=2**32), "seed=4294967296 must be at most 2**32 - 1"),
        (dict(resume="/nonexistent/ckpt"), "resume='/nonexistent/ckpt': not 'none', 'auto' or an existing"),
        (dict(auto_augment="rand-x9"), "auto_augment='rand-x9' is not a timm augmentation spec"),
        (dict(micro_batch_size=96), "global_batch_size=4096 is not a multiple of micro_batch_size=96"),
        (dict(seed=-1), "seed=-1 must be >= 0"),
        (dict(img_size=0), "img_size=0 must be >= 1"),
        (dict(keep_classifier=True), "keep_classifier=true needs init_from"),
        (dict(init_from_ema=True), "init_from_ema=true needs init_from"),
        (dict(ds_config="zero9"), "ds_config: 'zero9' is neither a file nor one of ds_configs/"),
        (dict(output_dir=""), "output_dir='' is empty"),
    ],
)
def test_every_vision_field_is_range_checked(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(TrainConfig(data_dir="x", **overrides))


def test_vision_output_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("keep")
    with pytest.raises(ValueError, match=re.escape(f"output_dir='{tmp_path}/taken' is an existing file")):
        validate(TrainConfig(data_dir="x", output_dir=str(tmp_path / "taken")))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "{tmp}/bad.yaml"], "vision.train: error: {tmp}/bad.yaml:2:1: not valid YAML"),
        (
            ["--config", "{tmp}/typo.yaml"],
            "vision.train: error: {tmp}/typo.yaml: unknown config key 'warmup_epoch' (did you mean warmup_epochs",
        ),
        (["--lr", "abc"], "vision.train: error: --lr 'abc': expected float, e.g. --lr 0.002"),
        (
            ["--config", "no_such_preset"],
            "vision.train: error: config='no_such_preset': no such file, nor a preset in vision/configs/",
        ),
        (["--config"], "vision.train: error: --config needs a value: a preset name (fashion_mnist_tiny"),
    ],
)
def test_vision_cli_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str
) -> None:
    (tmp_path / "bad.yaml").write_text("epochs: 3\n\tlr: 1\n")
    (tmp_path / "typo.yaml").write_text("epochs: 3\nwarmup_epoch: 1\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message.replace("{tmp}", str(tmp_path))), err
    assert "Traceback" not in err and "usage:" not in err
    monkeypatch.setenv("LOCAL_RANK", "1")  # the other ranks of a node say nothing: one line per node
    assert main(argv) == 2
    assert capsys.readouterr().err == ""


def test_vision_help_lists_every_field_with_its_comment(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--micro_batch_size INT  (default: 128)\n        per rank and forward pass" in out
    assert "--layer_decay FLOAT|none  (default: none)" in out and "--scale NUMBER [NUMBER ...]" in out
