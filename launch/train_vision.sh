#!/usr/bin/env bash
""":"
# Bash and Python in one file, like launch/pretrain_llama.sh: `deepspeed launch/train_vision.sh ...` runs it with
# python on every rank, and the Python lines at the bottom hand the rank back to bash, which runs vision.train.
#
# Train ParameterNet CNNs (or any timm model) on the DeepSpeed engine.
#
#   bash launch/train_vision.sh
#       The laptop demo: parameternet_tiny and its static twin ghostnet_tiny on real Fashion-MNIST (32x32, CPU,
#       a few minutes), then both accuracies side by side. Runs land in runs/vision/demo/ (a second call resumes,
#       i.e. only prints; delete the folder to train again). DEMO_ARGS="--epochs 1" adds flags to both runs;
#       OMP_NUM_THREADS (default 1 here) sets the compute threads.
#
#   bash launch/train_vision.sh [--num-gpus N] [--hostfile FILE] [--master-port P] [--] <vision.train flags>
#       One training run; N > 1 (or a hostfile) goes through the `deepspeed` launcher, which on a machine without a
#       GPU starts N CPU ranks. Examples:
#         bash launch/train_vision.sh --num-gpus 8 --config parameternet_600m_in22k --data_dir /data/imagenet22k
#         bash launch/train_vision.sh --num-gpus 8 --config parameternet_600m_in1k_ft --data_dir /data/imagenet \
#             --init_from runs/vision/parameternet_600m_in22k
#         bash launch/train_vision.sh --num-gpus 2 --config fashion_mnist_tiny --output_dir runs/vision/fm_2rank
#       --num-gpus, --hostfile and --master-port set NPROC, HOSTFILE and MASTER_PORT; the rest of the environment is
#       launch/pretrain_llama.sh's (launch/common.sh): NNODES/NODE_RANK/MASTER_ADDR for one launcher per node, the
#       srun step's nodes inside SLURM. Also: deepspeed [launcher flags] launch/train_vision.sh <vision.train flags>.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source "$repo/launch/common.sh"

# Launchers append --local_rank=N; vision.train reads the rank from the environment.
user_args=()
for arg in "$@"; do [[ "$arg" == --local_rank* ]] || user_args+=("$arg"); done
set -- "${user_args[@]+"${user_args[@]}"}"
if inside_launcher; then  # already a rank: train in this process
  exec "$PY" -u -m vision.train "$@"
fi

demo() {
  local out=${DEMO_DIR:-runs/vision/demo}
  # One compute thread unless told otherwise: on these tiny 32x32 shapes a second thread gains ~15% on an idle machine
  # but makes every op wait for a descheduled thread on a busy one (measured 3-40x slower).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  local models=(parameternet_tiny ghostnet_tiny)
  for model in "${models[@]}"; do
    echo "== train_vision.sh: $model on Fashion-MNIST (output: $out/$model)"
    # shellcheck disable=SC2086  # DEMO_ARGS is a list of flags
    "$PY" -m vision.train --config fashion_mnist_tiny --model "$model" --output_dir "$out/$model" ${DEMO_ARGS:-}
  done
  "$PY" - "$out" "${models[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, models = Path(sys.argv[1]), sys.argv[2:]
rows = [json.loads((out / m / "final_metrics.json").read_text()) for m in models]
print()
print(f"{'model':<20} {'experts':>7} {'params':>9} {'MMACs':>7} {'top-1 %':>8} {'top-5 %':>8} {'val loss':>9} {'train s':>8}")
for r in rows:
    print(f"{r['model']:<20} {r['num_experts'] or '-':>7} {r['params'] / 1e6:>8.2f}M {r['macs'] / 1e6:>7.2f} "
          f"{r['top1']:>8.2f} {r['top5']:>8.2f} {r['val_loss']:>9.4f} {r['seconds']:>8.0f}")
a, b = rows
print(f"\n{a['model']} vs {b['model']}: top-1 {a['top1'] - b['top1']:+.2f} points at "
      f"{a['macs'] / b['macs']:.2f}x the multiply-adds and {a['params'] / b['params']:.2f}x the parameters "
      f"({a['val_images']} Fashion-MNIST test images, {a['epochs']} epoch(s), {a['global_step']} steps)")
EOF
}

if [ $# -eq 0 ]; then
  demo
  exit 0
fi

while [ $# -gt 0 ]; do
  case "$1" in
    --num-gpus) NPROC=$2; shift 2 ;;
    --hostfile) HOSTFILE=$2; shift 2 ;;
    --master-port) MASTER_PORT=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
deepspeed_launcher
if [ "$NPROC" = 1 ] && [ -z "${HOSTFILE:-}" ] && [ "${NNODES:-1}" = 1 ]; then
  exec "$PY" -m vision.train "$@"   # one rank: no launcher
fi
set +e; "${LAUNCHER[@]}" --module vision.train "$@"; rc=$?
exit "$rc"  # (not exec: the EXIT trap removes the launcher's temporary hostfile)
BASH ENDS
":"""
# Python: a launcher started this file with python on one rank (its rank variables are set); bash runs vision.train.
import os
import sys

os.execvp("bash", ["bash", os.path.abspath(__file__), *sys.argv[1:]])
