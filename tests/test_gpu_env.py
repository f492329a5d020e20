"""The GPU suite's pre-flight (benchmarks/gpu_env.py): carried wheels are installed where the machine lacks them or
has them out of range, and an unmet requirement is one line naming who needs what, what the machine has, and the fix
- before the suite spends its 15 minutes of device time."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.version import Version

from tests.trainer_utils import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_env  # noqa: E402  (a script of benchmarks/, not a package)


def wheel(directory: Path, name: str, version: str, *requires: str) -> Path:
    """A minimal wheel: its file name and a METADATA with Requires-Dist lines, all the pre-flight reads."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{version}-py3-none-any.whl"
    meta = [
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
        *(f"Requires-Dist: {r}" for r in requires),
    ]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
    return path


def test_a_carried_wheel_is_installed_where_the_machine_lacks_it_or_has_it_out_of_range(tmp_path: Path) -> None:
    wheel(tmp_path, "datasets", "5.2.0", "pyarrow>=24.0.0", 'multiprocess; python_version < "3"')
    wheel(tmp_path, "typing_extensions", "4.16.0")
    wheel(tmp_path, "pydantic", "2.14.4", "typing-extensions>=4.16.0")
    wheels = gpu_env.read_wheels(tmp_path)
    machine = {"pyarrow": Version("26.0.1"), "typing-extensions": Version("4.12.2"), "datasets": Version("5.2.0")}
    install = {w.name for w in gpu_env.plan(wheels, machine)}
    # pydantic is missing; the machine's typing-extensions is too old for it; its datasets is the carried version.
    assert install == {"pydantic", "typing-extensions"}
    active = {**machine, **{n: wheels[n].version for n in install}}
    assert not [p for p in gpu_env.problems(wheels, active) if "carried" in p]


def test_an_unmet_requirement_is_one_line_with_the_fix(tmp_path: Path) -> None:
    wheel(tmp_path, "datasets", "5.2.0", "pyarrow>=24.0.0", "dill<0.4.2,>=0.3.0")
    wheels = gpu_env.read_wheels(tmp_path)
    lines = gpu_env.problems(wheels, {"pyarrow": Version("19.0.1"), "datasets": Version("5.2.0")})
    carried = [line for line in lines if line.startswith("datasets 5.2.0 (carried)")]
    assert carried == [
        "datasets 5.2.0 (carried) needs pyarrow>=24.0.0; this machine has pyarrow 19.0.1: carry a pyarrow that fits: "
        "add it to ALSO_CARRY in benchmarks/gpu_wheels.sh",
        "datasets 5.2.0 (carried) needs dill<0.4.2,>=0.3.0, which this machine lacks; carry it: add it to ROOTS in "
        "benchmarks/gpu_wheels.sh",
    ]


def test_check_reports_a_mismatch_that_no_step_needs_and_blocks_nothing(tmp_path: Path) -> None:
    """The real command, in this environment, against a carried wheel that needs a numpy nobody has and that no step
    imports: one line with the fix, every step still ready, exit 0 (tests/test_gpu_suite.py: one that blocks)."""
    wheel(tmp_path / "wheels", "needs_new_numpy", "1.0", "numpy>=999")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_env.py"),
            "check",
            str(tmp_path / "wheels"),
            "--device",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    numpy_lines = [line for line in proc.stderr.splitlines() if "numpy>=999" in line]
    assert numpy_lines == [
        f"gpu_suite.sh: pre-flight: needs-new-numpy 1.0 (carried) needs numpy>=999; this machine has numpy "
        f"{gpu_env.machine_versions()['numpy']}: carry a numpy that fits: add it to ALSO_CARRY in "
        f"benchmarks/gpu_wheels.sh"
    ]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["blocks"] for r in lines if r["step"] == "preflight_mismatch" and "numpy>=999" in r["problem"]] == [[]]
    assert lines[-1]["step"] == "preflight" and "version_transformers" in lines[-1]
    assert lines[-1]["ready_steps"] == ["train", "moe", "vision", "tests"]
