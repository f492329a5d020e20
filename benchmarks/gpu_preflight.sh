#!/usr/bin/env bash
# The GPU suite's rehearsal, on a machine WITH PyPI and without a GPU (not part of `make test`: it downloads several
# GB once):
#
#   bash benchmarks/gpu_preflight.sh
#
# 1. builds an environment like the lent GPU machine's image (/work/.library/device/KINDS.md, ../shared/ENV.md) in
#    $PREFLIGHT_DIR (default /tmp/pn-gpu-preflight, reused by a second call): Python 3.12 (pyenv's where there is one,
#    else python3.12 from PATH), torch 2.11.0 (the cu130 build the image has) and the versions the device documentation
#    lists (DEVICE_PINS below), then whatever else the carried wheels need that the image is documented to have;
# 2. builds the carried wheels (benchmarks/gpu_wheels.sh) where benchmarks/wheels/ has none;
# 3. runs `GPU_SUITE_SMOKE=1 bash benchmarks/gpu_suite.sh` with that python: the pre-flight, the wheel install and
#    every step on CPU with tiny shapes;
# 4. runs the GPU tests' code on CPU in it (`PN_GPU_TESTS_DEVICE=cpu pytest -m gpu tests/gpu`) and prints its wall
#    time: the measurement that gpu_suite.sh's T_TESTS is set from.
# Prints one summary line per step and exits non-zero if any failed.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2
DIR="${PREFLIGHT_DIR:-/tmp/pn-gpu-preflight}"
VENV="$DIR/venv"
# The image's versions as the device documentation lists them (KINDS.md "pip list", 2026-11).
DEVICE_PINS="torch==2.11.0 transformers==5.17.0 numpy==2.5.2 safetensors==0.8.0 sentencepiece==0.2.2
tokenizers==0.23.2 accelerate==1.15.0 huggingface_hub==1.33.0 timm pytest pytest-timeout tensorboard pyarrow xxhash
protobuf packaging"
die() { echo "gpu_preflight.sh: error: $*" >&2; exit 2; }

py312=""
for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 "$(command -v python3.12 || true)"; do
  [ -x "$candidate" ] && { py312="$candidate"; break; }
done
[ -n "$py312" ] || die "no Python 3.12 (the GPU image's): install one with pyenv (pyenv install 3.12) or put python3.12 on PATH"

mkdir -p "$DIR"
if [ ! -f "$VENV/.device-like" ]; then
  echo "== gpu_preflight: building the device-like environment in $VENV ($py312; several GB, once)"
  "$py312" -m venv "$VENV" || die "cannot create a venv at $VENV with $py312"
  # shellcheck disable=SC2086  # DEVICE_PINS is a list of requirements
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check $DEVICE_PINS \
    || die "pip could not install the device's packages ($DEVICE_PINS) into $VENV"
  touch "$VENV/.device-like"
fi

if ! compgen -G "benchmarks/wheels/*.whl" > /dev/null; then
  echo "== gpu_preflight: building the carried wheels (benchmarks/gpu_wheels.sh)"
  bash benchmarks/gpu_wheels.sh > "$DIR/gpu_wheels.log" 2>&1 || die "benchmarks/gpu_wheels.sh failed: see $DIR/gpu_wheels.log"
fi

# What the carried wheels need beyond themselves is what the image is documented to have (gpu_wheels.sh carries
# everything else): install it here as the image has it, so the pre-flight below sees a machine like the device.
missing=$("$VENV/bin/python" benchmarks/gpu_env.py missing benchmarks/wheels) || die "benchmarks/gpu_env.py missing failed"
if [ -n "$missing" ]; then
  echo "== gpu_preflight: the image's packages that the wheels need: $(echo "$missing" | tr '\n' ' ')"
  echo "$missing" | "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r /dev/stdin \
    || die "pip could not install $(echo "$missing" | tr '\n' ' ')"
fi

status=0
echo "== gpu_preflight: GPU_SUITE_SMOKE=1 bash benchmarks/gpu_suite.sh (python $("$VENV/bin/python" -V 2>&1))"
site="$DIR/site"
rm -rf "$site"  # the suite's own --target folder from an earlier rehearsal: this script made it
out="$DIR/suite_out"
mkdir -p "$out"
if PYTHON="$VENV/bin/python" GPU_SUITE_SMOKE=1 GPU_SUITE_SITE="$site" OUT="$out" bash benchmarks/gpu_suite.sh; then
  echo "gpu_preflight: suite (smoke): rc 0; JSON lines in $out/gpu_suite.jsonl"
else
  status=1; echo "gpu_preflight: suite (smoke): FAILED; see $out/gpu_suite.log"
fi
tail -n 1 "$out/gpu_suite.jsonl"

echo "== gpu_preflight: PN_GPU_TESTS_DEVICE=cpu pytest -m gpu tests/gpu (the GPU tests' code, in the device-like env)"
start=$(date +%s)
PYTHONPATH="$repo:$site" PATH="$site/bin:$VENV/bin:$PATH" PN_GPU_TESTS_DEVICE=cpu HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 "$VENV/bin/python" -m pytest -m gpu -q -p no:cacheprovider tests/gpu
rc=$?
echo "gpu_preflight: GPU tests' code on CPU: rc $rc in $(( $(date +%s) - start )) s"
[ "$rc" = 0 ] || status=1
exit "$status"
