#!/usr/bin/env bash
# One experiment end to end: train every arm with several seeds, evaluate each run zero-shot on the offline suite,
# and write one report (markdown + PNG) with mean ± std over seeds and paired differences with 95% t intervals.
#
#   bash launch/experiment.sh paper-llm [--force] [-- TRAINER ARGS...]
#   bash launch/experiment.sh paper-llm-scaling [--force] [-- TRAINER ARGS...]
#   bash launch/experiment.sh canonical-moe [--force] [-- TRAINER ARGS...]
#   bash launch/experiment.sh paper-vision [--force] [-- VISION.TRAIN ARGS...]
#
# paper-llm: vanilla LLaMA vs ParameterNet-LLaMA (8 experts, top-1, down_proj: the headline); experts on gate_proj,
# up_proj, down_proj (the paper's Table 7); 2, 4, 8 experts on down_proj; a vanilla LLaMA widened to ParameterNet's
# total parameter count (more FLOPs: the ceiling). The arms are listed by `python -m evals.experiment arms paper-llm`.
# Runs go to OUT/<arm>/seed<N>/ (launch/compare.sh does the training and evaluation: same seed = same data order in
# every arm); the report to OUT/report.md, OUT/loss.png, OUT/accuracy.png (and OUT/compare/, evals.compare's
# per-task table).
# paper-llm-scaling: where in tokens a mixture of experts beats dense (issue 20): vanilla, ParameterNet with 8 experts on
# down_proj (the headline) and on up_proj, a standard MoE of 8 whole SwiGLU MLPs (the control), and the widened dense
# ceiling, at SIZE=micro (>= 2 tokens per non-embedding parameter), each validated at 10 log-spaced token counts on
# the same held-out tokens (eval_points, a wsd schedule); no zero-shot evaluation. The report (paired differences at
# every validation, the crossover, router diagnostics) goes to OUT/report.md, loss.png, routing.png.
# canonical-moe: the canonical result (issue 32): where the dense ceiling has room to win (CONFIG=micro-room: 1,200
# iterations, 6.2 tokens per non-embedding parameter, one pass over pd-english), vanilla against the ceiling, a
# standard MoE, ParameterNet on up_proj and diagnostics (fewer seeds), read as paper-llm-scaling is; SEEDS=5.
# paper-vision: the static twin ghostnet_tiny_os4 against parameternet_tiny_os4 with 1, 2 and 4 experts on
# Fashion-MNIST at 32 px (vision/configs/fashion_mnist_tiny.yaml, one epoch), where the experts cost at most 1.06x the twin's
# multiply-adds; runs to OUT/<arm>/seed<N>/ (vision.train), the report to OUT/report.md with paired top-1 differences.
# Resumable: a finished run (summary.json; for paper-llm also an evaluation of its final iteration) is skipped, an
# interrupted one resumes from its last checkpoint (--resume auto); --force retrains and re-evaluates everything.
# Ctrl-C (or SIGTERM) stops it: every training running checkpoints and stops, and the experiment exits non-zero
# (3, or 130 for paper-vision's interrupt) without evaluating or reporting a stopped run; the same command resumes.
# Environment:
#   SIZE=small         the model and training presets (llama-$SIZE, parameternet-llama-$SIZE, llm/configs/$SIZE.yaml);
#                      paper-llm-scaling: SIZE=micro
#   SEEDS=3            seeds per arm: SEED, SEED+1, ...      SEED=1234 (paper-vision: 42)
#   OUT=runs/experiment/<experiment>
#   ARMS=all           or a comma-separated subset with the baseline, e.g. vanilla,pn-down-e8 or static,pn-e4
# paper-vision only:
#   JOBS=1             runs trained at once (JOBS=2 with OMP_NUM_THREADS=1: one 32-px run per core)
# paper-llm only:
#   TASKS=llama        zero-shot tasks (offline)             LIMIT=50    documents per task ("none": all of them)
#   TRAIN_ITERS=N      overrides the preset's train_iters    CORPUS=NAME  --corpus NAME for the trainer
#   NPROC, CONFIG, DS_CONFIG, ...   as in launch/pretrain_llama.sh
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source "$repo/launch/common.sh"

usage() { sed -n '2,38p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "experiment.sh: error: $*" >&2; exit 2; }

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  paper-llm|paper-llm-scaling|canonical-moe|paper-vision) experiment="$1"; shift ;;
  "") die "name the experiment: bash launch/experiment.sh paper-llm (see --help)" ;;
  *) die "unknown experiment '$1'; known: paper-llm, paper-llm-scaling, canonical-moe, paper-vision" ;;
esac
force=()
trainer_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=(--force); shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; trainer_args=("$@"); break ;;
    *) die "unknown option '$1' (trainer options go after --; see --help)" ;;
  esac
done

if [ "$experiment" = paper-vision ]; then
  seeds="${SEEDS:-3}"
  seed="${SEED:-42}"
  out="${OUT:-runs/experiment/$experiment}"
  [[ "$seeds" =~ ^[1-9][0-9]*$ ]] || die "SEEDS='$seeds': give a positive integer (3 or more for intervals)"
  [[ "$seed" =~ ^[0-9]+$ ]] || die "SEED='$seed': give a non-negative integer"
  arms="$("$PY" -m evals.experiment arms "$experiment" --arms "${ARMS:-all}")" || exit 2
  echo "=== $experiment: $(echo "$arms" | wc -l) arms x $seeds seeds -> $out" >&2
  jobs="${JOBS:-1}"
  [[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "JOBS='$jobs': give a positive integer (runs trained at once)"
  # Background jobs of a script ignore SIGINT: on Ctrl-C (or TERM) this shell asks each training to checkpoint and
  # stop (TERM to train_vision.sh), waits for them, and exits without a report.
  stop_runs() {
    trap - INT TERM
    echo "experiment.sh: interrupted: every training running checkpoints and stops; the same command resumes" >&2
    local p
    for p in $(jobs -rp); do kill -TERM "$p" 2>/dev/null || true; done
    wait || true
    exit 130
  }
  trap stop_runs INT TERM
  run_dirs=()
  while IFS= read -r spec; do
    read -r -a words <<< "$spec"
    name="${words[0]}"
    for ((i = 0; i < seeds; i++)); do
      s=$((seed + i))
      run_dir="$out/$name/seed$s"
      run_dirs+=("$run_dir")
      if [ ${#force[@]} -gt 0 ] || ! "$PY" -m runtime.rundir finished "$run_dir" >/dev/null 2>&1; then
        echo "=== train $name (seed $s) -> $run_dir" >&2
        [ ${#force[@]} -gt 0 ] && rm -rf "$run_dir"
        # At most JOBS runs at once; `wait -n` returns the status of a run that ended, so a failure stops here (set -e).
        while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
        # One epoch of the preset's 9,600 images: 12 runs in about 12 minutes with JOBS=2 (flags after -- win).
        bash launch/train_vision.sh --config fashion_mnist_tiny --epochs 1 --eval_interval_epochs 1 "${words[@]:1}" \
          "${trainer_args[@]+"${trainer_args[@]}"}" --seed "$s" --output_dir "$run_dir" --resume auto &
      else
        echo "=== $name (seed $s): done ($run_dir/summary.json), skipped" >&2
      fi
    done
  done <<< "$arms"
  while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n; done
  trap - INT TERM
  # A training stopped by a signal exits 0 with a checkpoint but no summary.json: not finished, not reported.
  for run_dir in "${run_dirs[@]}"; do
    if ! state="$("$PY" -m runtime.rundir finished "$run_dir" 2>&1)"; then
      echo "experiment.sh: error: ${state#*error: }; no report is written from a stopped run: run the same" \
        "command again to resume it" >&2
      exit 3
    fi
  done
  exec "$PY" -m evals.experiment report "$out" --experiment "$experiment"
fi

if [ "$experiment" = paper-llm-scaling ] || [ "$experiment" = canonical-moe ]; then
  export SIZE="${SIZE:-micro}"
  # The training preset: micro.yaml for the token-scaling study, micro-room.yaml for the canonical result.
  [ "$experiment" = canonical-moe ] && export CONFIG="${CONFIG:-micro-room}"
  default_seeds=3
  [ "$experiment" = canonical-moe ] && default_seeds=5
  seeds="${SEEDS:-$default_seeds}"
  seed="${SEED:-1234}"
  out="${OUT:-runs/experiment/$experiment}"
  [[ "$seeds" =~ ^[1-9][0-9]*$ ]] || die "SEEDS='$seeds': give a positive integer (3 or more for intervals)"
  [[ "$seed" =~ ^[0-9]+$ ]] || die "SEED='$seed': give a non-negative integer"
  # One line per arm: the seeds it is trained with (fewer for a diagnostic arm), then its name and trainer flags.
  specs="$("$PY" -m evals.experiment arms "$experiment" --size "$SIZE" --arms "${ARMS:-all}" --seeds "$seeds")" || exit 2
  echo "=== $experiment: $(echo "$specs" | wc -l) arms x up to $seeds seeds, SIZE=$SIZE -> $out" >&2
  run_dirs=()
  while IFS= read -r line; do
    arm_seeds="${line%% *}"
    spec="${line#* }"
    read -r -a words <<< "$spec"
    name="${words[0]}"
    for ((i = 0; i < arm_seeds; i++)); do
      s=$((seed + i))
      run_dir="$out/$name/seed$s"
      run_dirs+=("$run_dir")
      if [ ${#force[@]} -eq 0 ] && "$PY" -m runtime.rundir finished "$run_dir" >/dev/null 2>&1; then
        echo "=== $name (seed $s): done ($run_dir/summary.json), skipped" >&2
        continue
      fi
      echo "=== train $name (seed $s) -> $run_dir" >&2
      [ ${#force[@]} -gt 0 ] && rm -rf "$run_dir"
      # Validation loss is the measure here (zero-shot tasks sit at chance at this size): no export, no lm-eval.
      # A signal stops the training with a checkpoint and exit 0; the check below then stops the experiment.
      bash launch/pretrain_llama.sh "${words[@]:1}" "${trainer_args[@]+"${trainer_args[@]}"}" --seed "$s" \
        --output_dir "$run_dir" --resume auto --export false --progress_bar false
      if ! state="$("$PY" -m runtime.rundir finished "$run_dir" 2>&1)"; then
        echo "experiment.sh: error: ${state#*error: }; no report is written from a stopped run: run the same" \
          "command again to resume it" >&2
        exit 3
      fi
    done
  done <<< "$specs"
  names="$(echo "$specs" | cut -d' ' -f2 | paste -sd, -)"
  exec "$PY" -m evals.experiment report "$out" --experiment "$experiment" --arms "$names"
fi

export SIZE="${SIZE:-small}"
seeds="${SEEDS:-3}"
seed="${SEED:-1234}"
out="${OUT:-runs/experiment/$experiment}"
tasks="${TASKS:-llama}"
limit="${LIMIT:-50}"
[[ "$seeds" =~ ^[1-9][0-9]*$ ]] || die "SEEDS='$seeds': give a positive integer (3 or more for intervals)"
[[ "$seed" =~ ^[0-9]+$ ]] || die "SEED='$seed': give a non-negative integer"
[[ "$limit" =~ ^([1-9][0-9]*|none)$ ]] || die "LIMIT='$limit': give documents per task, a positive integer, or none"
if [ -n "${TRAIN_ITERS:-}" ]; then
  [[ "$TRAIN_ITERS" =~ ^[1-9][0-9]*$ ]] || die "TRAIN_ITERS='$TRAIN_ITERS': give a positive integer"
  trainer_args=(--train_iters "$TRAIN_ITERS" "${trainer_args[@]+"${trainer_args[@]}"}")
fi
[ -z "${CORPUS:-}" ] || trainer_args=(--corpus "$CORPUS" "${trainer_args[@]+"${trainer_args[@]}"}")

# The arms as compare.sh --run specifications (evals/experiment/arms.py holds the table; it refuses unknown names).
specs="$("$PY" -m evals.experiment arms "$experiment" --size "$SIZE" --arms "${ARMS:-all}")" || exit 2
runs=()
names=()
while IFS= read -r spec; do
  runs+=(--run "$spec")
  names+=("${spec%% *}")
done <<< "$specs"
limit_args=()
[ "$limit" = none ] || limit_args=(--limit "$limit")

echo "=== $experiment: ${#names[@]} arms (${names[*]}) x $seeds seeds, SIZE=$SIZE -> $out" >&2
bash launch/compare.sh --out "$out" --seeds "$seeds" --seed "$seed" --tasks "$tasks" --offline \
  "${limit_args[@]+"${limit_args[@]}"}" "${force[@]+"${force[@]}"}" "${runs[@]}" \
  -- "${trainer_args[@]+"${trainer_args[@]}"}"
arms_csv="$(IFS=,; echo "${names[*]}")"
exec "$PY" -m evals.experiment report "$out" --experiment "$experiment" --arms "$arms_csv"
