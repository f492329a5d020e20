"""A non-editable install trains: a wheel built from the sources, installed into a fresh virtual environment and run
from a directory outside the checkout, finds its package data and writes nothing next to its code.

The environment sits on top of the project's: a .pth line puts the project venv's site-packages after the new one's,
so the dependencies are there without a reinstall. (`python -m venv --system-site-packages` would not do: from a
venv's interpreter it exposes the base Python's site-packages, not the venv's.) Path lines in a .pth file add the
directory only; the .pth files inside it, among them the editable install's finder that maps `llm` to the checkout,
are not run: the only `llm` the new interpreter finds is the installed one, which the probe below checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from llm.model.presets import list_presets
from llm.train.config import load_config
from tests.trainer_utils import tiny_args, tiny_image_folder, tiny_vision_args

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "llm", "vision", "evals")
# What the build reads (pyproject.toml names README.md as the long description; ds_configs/ is data only).
SOURCES = ("pyproject.toml", "README.md", *PACKAGES, "ds_configs")
# Package data the installed code must find: (package directory, glob) -> the checkout's files are the expected set.
PACKAGE_DATA = (
    ("ds_configs", "*.json"),
    ("llm/configs", "*.json"),
    ("llm/configs", "*.yaml"),
    ("vision/configs", "*.yaml"),
    ("evals/tasks", "*.yaml"),
    ("evals/tasks", "*.py"),
)

PROBE = r"""
import importlib, json, sys
import runtime, llm, vision, evals
from runtime.ds_config import DS_CONFIG_DIR, resolve_ds_config_path
from llm.model.presets import list_presets, load_model_config
from llm.train.config import CONFIG_DIR, load_config
from runtime.paths import default_data_dir
from vision.config import PRESET_DIR
from evals.suite import TASKS_DIR
modules = ["llm.pretrain", "llm.train.trainer", "llm.model.modeling_parameternet_llama", "llm.data.corpus",
           "vision.train", "vision.config", "evals.zero_shot", "evals.compare", "runtime.dist", "runtime.ds_config"]
print(json.dumps({
    "files": {name: importlib.import_module(name).__file__ for name in ["runtime", "llm", "vision", "evals", *modules]},
    "sys_path": sys.path,
    "dirs": {"ds_configs": str(DS_CONFIG_DIR), "llm/configs": str(CONFIG_DIR),
             "vision/configs": str(PRESET_DIR), "evals/tasks": str(TASKS_DIR)},
    "presets": list_presets(),
    "ds_config_forms": [str(resolve_ds_config_path(form)) for form in ("zero2", "ds_configs/zero2.json")],
    "tiny_model_type": load_model_config("parameternet-llama-tiny").model_type,
    "tiny_train_iters": load_config("tiny").train_iters,
    "data_dir": str(default_data_dir()),
}))
"""


def _site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel installed into a fresh venv: its root, venv, python, site-packages and a working directory."""
    root = tmp_path_factory.mktemp("install")
    # Build from a copy: pip builds a local directory in place, and setuptools' build/ left in the checkout would
    # carry stale modules into a later wheel.
    src = root / "src"
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = _site_packages(python)
    (site / "parameternet_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # The project venv's pip under the new interpreter installs into the new venv (sys.prefix); it leaves the
    # editable install of the project venv alone ("outside environment").
    proc = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            str(src),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workdir = root / "elsewhere"  # outside the checkout: nothing of the repo is on sys.path through the cwd
    workdir.mkdir()
    return {"root": root, "venv": venv, "python": python, "site": site, "workdir": workdir}


def _env(installed: dict[str, Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PNET_DATA_DIR", "VIRTUAL_ENV")}
    home = installed["root"] / "home"
    home.mkdir(exist_ok=True)
    # A fresh home and cache: the default data directory of an installed package is the user's cache.
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        PATH=os.pathsep.join([str(installed["venv"] / "bin"), env.get("PATH", "")]),
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions")),
    )
    return env


def _run(installed: dict[str, Path], *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(installed["python"]), *args],
        cwd=installed["workdir"],
        env=_env(installed),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_wheel_holds_the_package_data(installed: dict[str, Path]) -> None:
    records = next(installed["site"].glob("parameternet_stack-*.dist-info")) / "RECORD"
    in_wheel = {line.split(",")[0] for line in records.read_text().splitlines()}
    for directory, pattern in PACKAGE_DATA:
        expected = {f"{directory}/{p.name}" for p in (REPO / directory).glob(pattern)}
        assert expected, f"no {pattern} under {REPO / directory}"
        assert expected <= in_wheel, f"missing from the wheel: {sorted(expected - in_wheel)}"
    assert not any(name.startswith(("tests/", "build/", "data/")) for name in in_wheel)


def test_the_installed_code_runs_from_the_install_and_finds_its_data(installed: dict[str, Path]) -> None:
    proc = _run(installed, "-c", PROBE, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    site = installed["site"].resolve()
    for name, file in probe["files"].items():
        assert Path(file).resolve().is_relative_to(site), f"{name} imported from {file}, not from {site}"
    assert str(REPO) not in probe["sys_path"] and "" not in probe["sys_path"][1:]
    for directory, found in probe["dirs"].items():
        assert Path(found).resolve() == site / directory
    # --ds_config by name and by its repository path (relative to the install, not the working directory) both work.
    assert {Path(found).resolve() for found in probe["ds_config_forms"]} == {site / "ds_configs" / "zero2.json"}
    # The installed package lists the presets the checkout ships (its own list, not a copy that rots when one is added).
    assert probe["presets"] == list_presets() and "parameternet-llama-tiny" in probe["presets"]
    assert probe["tiny_model_type"] == "parameternet_llama"
    assert probe["tiny_train_iters"] == load_config("tiny").train_iters
    data_dir = Path(probe["data_dir"])
    assert data_dir == installed["root"] / "home" / ".cache" / "parameternet" / "data"


def test_tiny_parameternet_trains_exports_and_evaluates_from_the_install(installed: dict[str, Path]) -> None:
    out = installed["workdir"] / "run"
    proc = _run(
        installed,
        "-m",
        "llm.pretrain",
        "--config",
        "tiny",
        "--model",
        "parameternet-llama-tiny",
        *tiny_args(train_iters=2, global_batch_size=2, warmup_iters=1, log_interval=None, export=True),
        "--output_dir",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "llm" and summary["iterations"] == 2 and summary["tokens"] == 2 * 2 * 32, summary
    # The export copies the model's code (auto_map) out of the installed package.
    for name in ("modeling_parameternet_llama.py", "configuration_parameternet_llama.py", "moe.py", "config.json"):
        assert (out / "hf" / name).is_file(), sorted(p.name for p in (out / "hf").iterdir())
    # The embedded corpus was built in the user's cache, not in site-packages.
    assert (installed["root"] / "home" / ".cache" / "parameternet" / "data" / "shakespeare").is_dir()
    assert not (installed["site"] / "data").exists()

    # lm-eval on the offline task YAMLs (and their data loader module) shipped in the wheel.
    proc = _run(
        installed,
        "-m",
        "evals.zero_shot",
        "--model",
        str(out),
        "--offline",
        "--tasks",
        "arc_easy",
        "--limit",
        "2",
        "--device",
        "cpu",
        "--batch_size",
        "2",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads((out / "eval" / "results.json").read_text())
    assert list(results["results"]) == ["arc_easy_offline"]


def test_tiny_vision_model_trains_from_the_install(installed: dict[str, Path]) -> None:
    images = tiny_image_folder(installed["root"] / "images")
    out = installed["workdir"] / "vision"
    proc = _run(
        installed,
        "-m",
        "vision.train",
        *tiny_vision_args(data_dir=images, log_interval=None, output_dir=out),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2
    assert not (installed["site"] / "data").exists()
