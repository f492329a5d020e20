"""Config fields carry their --help text and allowed values (runtime.config.opt): both trainers' --help lists every
field with its help and, where a field has them, every choice; a field declared without help is refused."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from llm.pretrain import main as llm_main
from llm.train.config import ENGINE as LLM_ENGINE
from runtime.config import ConfigEngine, opt
from runtime.fields import flag_text
from vision.config import ENGINE as VISION_ENGINE
from vision.train import main as vision_main


@pytest.mark.parametrize("engine, main", [(LLM_ENGINE, llm_main), (VISION_ENGINE, vision_main)], ids=["llm", "vision"])
def test_help_lists_every_field_with_its_help_and_choices(engine, main, capsys) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name, f in engine.fields.items():
        block = re.search(rf"^  --{name} [^\n]*?  \(default: [^\n]*\)\n((?:        [^\n]*\n)+)", text, re.MULTILINE)
        assert block is not None, f"--{name} missing from --help"
        lines = block.group(1).splitlines()
        assert lines[0].strip() == f.metadata["help"] and len(lines[0].strip()) > 5, name
        choices = engine.choices.get(name)
        if choices:
            # As typed after the flag: `none` for a field whose choices include "not set" (the MoE flags).
            assert lines[1].strip() == "choices: " + " | ".join(flag_text(c) for c in choices), name
    assert {"precision", "zero_stage"} <= set(engine.choices)
    if engine is LLM_ENGINE:
        assert "choices: none | softmax | normalized" in text  # --router_gate: none keeps the preset's


def test_choices_declared_on_a_field_are_checked() -> None:
    from llm.train.config import load_config

    with pytest.raises(ValueError, match="lr_decay_style"):
        load_config("tiny", cli_overrides=["--lr_decay_style", "cosine2"])


def test_a_field_without_help_is_refused(tmp_path: Path) -> None:
    @dataclasses.dataclass
    class Config:
        documented: int = opt(1, "a documented field")
        bare: int = 2

    with pytest.raises(KeyError, match="bare"):
        ConfigEngine(Config, preset_dir=tmp_path / "configs")
