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
#    every step on CPU with tiny shapes ("matched": the image as we guess it);
# 4. runs it again on a MISMATCHED image ("mismatched"): pyarrow 19.0.1 ahead of the image's (the carried datasets
#    needs a newer one) and no lm_eval among the carried wheels; the pre-flight must name both, and the training,
#    MoE and vision steps must still report (the check below fails the rehearsal otherwise);
# 5. runs the GPU tests' code on CPU in it (`PN_GPU_TESTS_DEVICE=cpu pytest -m gpu tests/gpu`) and prints its wall
#    time: the measurement that gpu_suite.sh's T_TESTS is set from (PREFLIGHT_GPU_TESTS=0 skips it).
# Prints both suites' JSON lines and one summary line per part; exits non-zero if any failed.
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
# run_suite LABEL WHEELS_DIR [PYTHONPATH]: the smoke suite on that image; its JSON lines in $DIR/suite_LABEL/.
run_suite() {
  local label=$1 wheels=$2 extra=${3:-} out="$DIR/suite_$1" site="$DIR/site_$1"
  rm -rf "$site" "$out"  # the suite's own --target folder and outputs from an earlier rehearsal: this script made them
  mkdir -p "$out"
  echo "== gpu_preflight: $label image: GPU_SUITE_SMOKE=1 bash benchmarks/gpu_suite.sh ($("$VENV/bin/python" -V 2>&1))"
  if PYTHONPATH="$extra" PYTHON="$VENV/bin/python" GPU_SUITE_SMOKE=1 GPU_SUITE_SITE="$site" GPU_SUITE_WHEELS="$wheels" \
    OUT="$out" bash benchmarks/gpu_suite.sh > "$out/stdout" 2> "$out/stderr"; then
    echo "gpu_preflight: suite (smoke, $label): rc 0"
  else
    status=1; echo "gpu_preflight: suite (smoke, $label): FAILED; see $out/gpu_suite.log"
  fi
  echo "-- $out/gpu_suite.jsonl:"
  cat "$out/gpu_suite.jsonl"
}
run_suite matched "$repo/benchmarks/wheels"

# The mismatched image: an older pyarrow ahead of the image's own, and no lm_eval wheel carried.
if [ ! -f "$DIR/pyarrow19/.done" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$DIR/pyarrow19" pyarrow==19.0.1 \
    && touch "$DIR/pyarrow19/.done" || die "pip could not install pyarrow==19.0.1 into $DIR/pyarrow19"
fi
rm -rf "$DIR/wheels_mismatched" && mkdir -p "$DIR/wheels_mismatched"
for w in benchmarks/wheels/*.whl; do
  case "$(basename "$w")" in lm_eval-*) ;; *) ln -s "$repo/$w" "$DIR/wheels_mismatched/" ;; esac
done
run_suite mismatched "$DIR/wheels_mismatched" "$DIR/pyarrow19"
# What the mismatched image must still give: both training lines with tokens/s, the MoE and vision lines, and the
# pre-flight's lines naming pyarrow and lm-eval.
if ! "$VENV/bin/python" - "$DIR/suite_mismatched/gpu_suite.jsonl" <<'PY'
import json, sys
lines = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
train = {r["model"]: r.get("tokens_per_s") for r in lines if r.get("step") == "train"}
problems = " ".join(r["problem"] for r in lines if r.get("step") == "preflight_mismatch")
checks = {
    "both training lines have tokens/s": len(train) == 2 and all(v is not None for v in train.values()),
    "the MoE line has its ratio": any(r.get("moe_throughput_vs_dense") is not None for r in lines),
    "the vision line has its models": any(r.get("step") == "vision" and "models" in r for r in lines),
    "a mismatch line names pyarrow": "pyarrow" in problems,
    "a mismatch line names lm-eval or lm_eval": "lm-eval" in problems or "lm_eval" in problems,
}
for what, ok in checks.items():
    print(f"gpu_preflight: mismatched image: {what}: {'yes' if ok else 'NO'}")
sys.exit(0 if all(checks.values()) else 1)
PY
then
  status=1
fi

if [ "${PREFLIGHT_GPU_TESTS:-1}" = 1 ]; then
  echo "== gpu_preflight: PN_GPU_TESTS_DEVICE=cpu pytest -m gpu tests/gpu (the GPU tests' code, in the device-like env)"
  site="$DIR/site_matched"
  start=$(date +%s)
  PYTHONPATH="$repo:$site" PATH="$site/bin:$VENV/bin:$PATH" PN_GPU_TESTS_DEVICE=cpu HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 "$VENV/bin/python" -m pytest -m gpu -q -p no:cacheprovider tests/gpu
  rc=$?
  echo "gpu_preflight: GPU tests' code on CPU: rc $rc in $(( $(date +%s) - start )) s"
  [ "$rc" = 0 ] || status=1
fi
exit "$status"
