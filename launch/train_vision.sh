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
#   [NPROC=N] [HOSTFILE=FILE] [MASTER_PORT=P] bash launch/train_vision.sh <vision.train flags>
#       One training run, with the environment of launch/pretrain_llama.sh (both source launch/common.sh): NPROC ranks
#       per node (CPU ranks without a GPU) through the `deepspeed` launcher, HOSTFILE for ssh-started nodes,
#       NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT for one launcher per node, the srun step's nodes inside SLURM.
#       SIGTERM/SIGUSR1/Ctrl-C make every rank checkpoint and exit 0 (a second Ctrl-C stops at once). Examples:
#         NPROC=8 bash launch/train_vision.sh --config parameternet_600m_in22k --data_dir /data/imagenet22k
#         NPROC=8 bash launch/train_vision.sh --config parameternet_600m_in1k_ft --data_dir /data/imagenet \
#             --init_from runs/vision/parameternet_600m_in22k
#         NPROC=2 bash launch/train_vision.sh --config fashion_mnist_tiny --output_dir runs/vision/fm_2rank
#       Also: deepspeed [launcher flags] launch/train_vision.sh <vision.train flags>.
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
  local models=(parameternet_tiny_os4 ghostnet_tiny_os4)
  for model in "${models[@]}"; do
    echo "== train_vision.sh: $model on Fashion-MNIST (output: $out/$model)"
    # shellcheck disable=SC2086  # DEMO_ARGS is a list of flags
    "$PY" -m vision.train --config fashion_mnist_tiny --model "$model" --output_dir "$out/$model" ${DEMO_ARGS:-}
  done
  # The report of evals.compare, as for language models (top-1/top-5, parameters, multiply-adds, loss curves), with
  # the static twin as the baseline: the delta column is ParameterNet's gain.
  "$PY" -m evals.compare "$out/${models[1]}" "$out/${models[0]}" --out "$out/compare"
}

if [ $# -eq 0 ]; then
  demo
  exit 0
fi

deepspeed_launcher
if [ "$NPROC" = 1 ] && [ -z "${HOSTFILE:-}" ] && [ "${NNODES:-1}" = 1 ]; then
  exec "$PY" -u -m vision.train "$@"   # one rank: no launcher (this process gets the signals itself)
fi
run_launcher "${LAUNCHER[@]}" --module vision.train "$@"
BASH ENDS
":"""
# Python: a launcher started this file with python on one rank (its rank variables are set); bash runs vision.train.
import os
import sys

os.execvp("bash", ["bash", os.path.abspath(__file__), *sys.argv[1:]])
