#!/usr/bin/env bash
# End to end: pretrain several models with the same data order and token budget, evaluate them zero-shot,
# and write the side-by-side report (markdown table, accuracy bars, loss curves).
#
#   bash launch/compare.sh [--out DIR] [--seeds N] [--seed S] [--tasks llama] [--limit N] [--offline|--online]
#                          [--run "NAME KIND [--key value ...]"]... [--force] [-- TRAINER ARGS...]
#
# Default runs: "llama llama" and "parameternet parameternet" (KIND is pretrain_llama.sh's first argument). The
# TRAINER ARGS after `--` go to every run (e.g. -- --train_iters 200 --seq_len 128); per-run arguments follow KIND,
# e.g. the paper's ablations:
#   --run "down parameternet" --run 'up parameternet --model_overrides {"moe_projections":["up_proj"]}'
#   --run 'e4 parameternet --model_overrides {"num_experts":4}'
# --seeds N trains every run with seeds S, S+1, ..., S+N-1 (default S=1234); run i of every model uses the same seed,
# hence the same data order. Runs go to OUT/NAME/seedS/; a finished run (summary.json) is reused unless --force, and
# so is an evaluation of its final iteration. A training stopped by a signal (Ctrl-C, SIGTERM: it checkpoints and
# exits 0) has not finished: compare.sh stops there with exit 3, and the same command resumes it. The report
# (OUT/compare/) covers every seed directory under OUT/NAME/.
# Environment: SIZE, NPROC, CONFIG, DS_CONFIG, ... as in launch/pretrain_llama.sh.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [ -x "$repo/.venv/bin/python" ]; then PY="$repo/.venv/bin/python"; else PY="$(command -v python3)"; fi

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "compare.sh: error: $*" >&2; exit 2; }

out="runs/compare-${SIZE:-tiny}"
seeds=1
seed=1234
tasks=llama
limit=""
mode=()
force=0
runs=()
trainer_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --seeds) seeds="${2:?--seeds needs a number}"; shift 2 ;;
    --seed) seed="${2:?--seed needs a number}"; shift 2 ;;
    --tasks) tasks="${2:?--tasks needs task names}"; shift 2 ;;
    --limit) limit="${2:?--limit needs a number}"; shift 2 ;;
    --offline|--online) mode=("$1"); shift ;;
    --run) runs+=("${2:?--run needs \"NAME KIND [--key value ...]\"}"); shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; trainer_args=("$@"); break ;;
    *) die "unknown option '$1' (trainer options go after --; see --help)" ;;
  esac
done
[[ "$seeds" =~ ^[1-9][0-9]*$ ]] || die "--seeds '$seeds': give a positive integer"
[[ "$seed" =~ ^[0-9]+$ ]] || die "--seed '$seed': give a non-negative integer"
[ ${#runs[@]} -gt 0 ] || runs=("llama llama" "parameternet parameternet")
[ ${#runs[@]} -ge 2 ] || die "give at least two --run specifications to compare"

names=()
for spec in "${runs[@]}"; do
  read -r -a words <<< "$spec"
  [ ${#words[@]} -ge 2 ] || die "--run '$spec': expected \"NAME KIND [--key value ...]\""
  name="${words[0]}"; kind="${words[1]}"
  [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run '$spec': NAME '$name' may hold only letters, digits, . _ -"
  case "$kind" in llama|parameternet) ;; *) die "--run '$spec': KIND must be llama or parameternet, got '$kind'" ;; esac
  for n in "${names[@]+"${names[@]}"}"; do [ "$n" != "$name" ] || die "run name '$name' is used twice"; done
  names+=("$name")
done

eval_args=(--tasks "$tasks" "${mode[@]+"${mode[@]}"}")
[ -n "$limit" ] && eval_args+=(--limit "$limit")

for spec in "${runs[@]}"; do
  read -r -a words <<< "$spec"
  name="${words[0]}"; kind="${words[1]}"; extra=("${words[@]:2}")
  for ((i = 0; i < seeds; i++)); do
    s=$((seed + i))
    run_dir="$out/$name/seed$s"
    if [ "$force" = 1 ] || ! "$PY" -m runtime.rundir finished "$run_dir" >/dev/null 2>&1; then
      echo "=== train $name (seed $s) -> $run_dir" >&2
      [ "$force" = 1 ] && rm -rf "$run_dir"
      # --resume auto: a run interrupted earlier continues from its last checkpoint instead of starting over.
      bash launch/pretrain_llama.sh "$kind" "${trainer_args[@]+"${trainer_args[@]}"}" \
        "${extra[@]+"${extra[@]}"}" --seed "$s" --output_dir "$run_dir" --resume auto
      # A stop signal makes the trainer checkpoint and exit 0 without summary.json: not a finished run.
      if ! state="$("$PY" -m runtime.rundir finished "$run_dir" 2>&1)"; then
        echo "compare.sh: error: training of $name (seed $s) was stopped: ${state#*error: }; nothing is evaluated" \
          "or reported from it: run the same command again to resume it" >&2
        exit 3
      fi
    fi
    # An evaluation is reused only when it is of the final iteration (an earlier one is of older weights).
    if [ "$force" = 1 ] || ! "$PY" -m evals.runs evaluated "$run_dir" >/dev/null 2>&1; then
      echo "=== evaluate $name (seed $s)" >&2
      bash launch/eval_zero_shot.sh "$run_dir" "${eval_args[@]}"
    fi
  done
done

groups=()
for name in "${names[@]}"; do groups+=("$out/$name"); done
labels="$(IFS=,; echo "${names[*]}")"
exec "$PY" -m evals.compare "${groups[@]}" --labels "$labels" --out "$out/compare"
