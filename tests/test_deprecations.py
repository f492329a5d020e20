"""Our code triggers no deprecation of transformers or torch.

pyproject.toml's filterwarnings turns a DeprecationWarning or FutureWarning attributed to one of our modules into an
error. A library attributes its deprecation to the caller's frame, which for a model's forward is torch's
nn.Module.__call__, not our module: so the model's paths (train step, checkpointed train step, cached generation,
save and reload through auto_map) are run here with every such warning recorded, whoever it names.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from llm.model import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM
from tests.tiny import TINY as TINY_SHAPE

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    **TINY_SHAPE,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def deprecations() -> Iterator[list[str]]:
    """Every DeprecationWarning / FutureWarning raised inside, and transformers' logged deprecations (its
    `past_key_values` -> `cache` rename, for one, is logged, not warned)."""
    found: list[str] = []
    handler = _Collect()
    logger = hf_logging.get_logger("transformers")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # the tests run with TRANSFORMERS_VERBOSITY=error (conftest)
    logging.Logger.warning_once.cache_clear()  # a message logged once before this test would hide here
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    found += [
        f"{w.category.__name__} {w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning))
    ]
    found += [f"transformers log: {m}" for m in handler.messages if "deprecat" in m.lower()]


def _exercise(model: torch.nn.Module, reload_dir: Path | None) -> None:
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.activation_checkpointing_enable()  # as the trainer does
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    with torch.no_grad():
        model.generate(ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), max_new_tokens=3, do_sample=False)
    if reload_dir is not None:
        model.save_pretrained(reload_dir)
        loaded = AutoModelForCausalLM.from_pretrained(reload_dir, trust_remote_code=True)
        with torch.no_grad():
            loaded.generate(ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize("kind", ["llama", "parameternet"])
def test_model_paths_raise_no_deprecation(kind: str, tmp_path: Path, one_torch_thread: None) -> None:
    torch.manual_seed(0)
    if kind == "llama":  # transformers' own model: if this fails, the deprecation is not ours
        model: torch.nn.Module = LlamaForCausalLM(LlamaConfig(**TINY))
    else:
        model = ParameterNetLlamaForCausalLM(ParameterNetLlamaConfig(**TINY, num_experts=4))
    with deprecations() as found:
        _exercise(model, tmp_path / "saved" if kind == "parameternet" else None)
    assert not found, "\n".join(found)


def _run_pytest_on(test_source: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    test_file = tmp_path / "test_filter.py"
    test_file.write_text(textwrap.dedent(test_source))
    # The project's pyproject.toml is the configuration; the sandbox test lies outside tests/ (no conftest).
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(REPO / "pyproject.toml"),
            "--rootdir",
            str(tmp_path),
            str(test_file),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_warning_filters_fail_a_test_only_for_a_warning_that_names_our_module(tmp_path: Path) -> None:
    """The module a warning names is the `__name__` of the frame it is attributed to: code run with our module
    names stands in for our modules (and a third party's for theirs)."""
    proc = _run_pytest_on(
        """
        import warnings

        import pytest

        CODE = "import warnings\\nwarnings.warn('old API', CATEGORY)\\n"

        @pytest.mark.parametrize("module", ["llm.train.trainer", "runtime", "vision.models.x", "evals.compare",
                                            "transformers.modeling_utils", "llmfoo", "evalsx.y", "torch"])
        @pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
        def test_warn(module, category):
            exec(compile(CODE, "<ours or theirs>", "exec"), {"__name__": module, "CATEGORY": category})
        """,
        tmp_path,
    )
    failed = sorted(line.split("::")[1].split(" ")[0] for line in proc.stdout.splitlines() if line.startswith("FAILED"))
    ours = ["llm.train.trainer", "runtime", "vision.models.x", "evals.compare"]
    assert failed == sorted(f"test_warn[{c}-{m}]" for c in ("DeprecationWarning", "FutureWarning") for m in ours), (
        proc.stdout + proc.stderr
    )
    assert "8 failed, 8 passed" in proc.stdout, proc.stdout
