#!/usr/bin/env bash
""":"
# This file is both a bash script and a Python script. `deepspeed launch/pretrain_llama.sh ...` (and torchrun) run it
# with python on every rank: Python sees the string that starts on the line above and ends at the line 'BASH ENDS',
# then runs the few lines at the bottom, which hand the rank back to bash; bash runs the line above as ':' (a no-op),
# then everything down to its `exit`, and never reaches the Python lines.
#
# Pretrain LLaMA or ParameterNet-LLaMA on the DeepSpeed engine. Every form starts the same trainer with the same
# model/size/config choice:
#   bash launch/pretrain_llama.sh [llama|parameternet] [--key value ...]        this script starts the launcher
#   deepspeed [--num_gpus N --num_nodes M --hostfile F ...] launch/pretrain_llama.sh [llama|parameternet] [...]
#   deepspeed --no_python launch/pretrain_llama.sh ...;  torchrun --nproc_per_node N launch/pretrain_llama.sh ...
#   srun --ntasks-per-node=R bash launch/pretrain_llama.sh ...                  one SLURM task per rank (R > 1)
#   srun --ntasks-per-node=1 bash launch/pretrain_llama.sh ...                  one launcher per SLURM node
# A rank (RANK set by a launcher, or one SLURM task per rank) runs the trainer itself; it never starts a launcher.
#
# With no arguments: tiny vanilla LLaMA on the embedded Shakespeare corpus, on CPU, a few minutes on 2 cores.
# Environment (all optional; NPROC, HOSTFILE, NNODES... are read by launch/common.sh, shared with train_vision.sh):
#   SIZE=tiny|micro|small|1b  model preset size (llama-$SIZE / parameternet-llama-$SIZE) and training preset
#                      llm/configs/$SIZE.yaml (tiny: a smoke run; small, micro: the CPU experiments, launch/experiment.sh)
#   CONFIG=FILE|NAME   training preset instead of $SIZE (YAML mirroring the --key flags)
#   NPROC=N            ranks per node (default: the visible GPUs, or 1 CPU rank without a GPU)
#   HOSTFILE=FILE      several nodes over ssh/pdsh (see launch/hostfile.example)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   one launcher per node without ssh (set for you inside an srun step)
#   DS_CONFIG=NAME     ds_configs/NAME.json (must agree with --zero_stage)
#   EP=N               expert_parallel_size
#   DRY_RUN=1          print the launcher command instead of running it
# Extra --key value pairs override any training-config field (e.g. --train_iters 100 --output_dir runs/x).
# SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 to this script or to its process group (or SIGUSR1 to the whole job step, as
# SLURM's --signal does) makes every rank finish its step, save a checkpoint and exit 0; this script exits 0 after the
# last rank. Rerun with --resume auto to continue. A second Ctrl-C stops at once, without a checkpoint.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# Launchers append --local_rank=N; the trainer reads the rank from the environment.
user_args=()
for arg in "$@"; do [[ "$arg" == --local_rank* ]] || user_args+=("$arg"); done
set -- "${user_args[@]+"${user_args[@]}"}"

model=llama
case "${1:-}" in
  llama|parameternet) model="$1"; shift ;;
  -*|"") ;;
  *) echo "pretrain_llama.sh: error: first argument must be 'llama' or 'parameternet', got '$1'" >&2; exit 2 ;;
esac
size="${SIZE:-tiny}"
# Every SIZE names a model preset pair; a CONFIG given instead of $SIZE.yaml still takes the models from SIZE.
[ -f "$repo/llm/configs/llama-$size.json" ] && [ -f "$repo/llm/configs/parameternet-llama-$size.json" ] || {
  sizes="$(cd "$repo/llm/configs" && ls parameternet-llama-*.json | sed 's/^parameternet-llama-//; s/\.json$//' | tr '\n' ' ')"
  echo "pretrain_llama.sh: error: SIZE=$size has no presets llm/configs/llama-$size.json and" \
    "parameternet-llama-$size.json; use one of: $sizes" >&2
  exit 2
}
preset="llama-$size"; [ "$model" = parameternet ] && preset="parameternet-llama-$size"
args=(--config "${CONFIG:-$size}" --model "$preset" --output_dir "runs/$model-$size")
[ -n "${DS_CONFIG:-}" ] && args+=(--ds_config "$DS_CONFIG")
[ -n "${EP:-}" ] && args+=(--expert_parallel_size "$EP")

source "$repo/launch/common.sh"

if inside_launcher; then  # already a rank: run the trainer in this process (runtime.slurm maps SLURM's task ids)
  exec "$PY" -u -m llm.pretrain "${args[@]}" "$@"
fi
deepspeed_launcher
cmd=("${LAUNCHER[@]}" llm/pretrain.py "${args[@]}" "$@")

if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi

run_launcher "${cmd[@]}"
BASH ENDS
":"""
# Python: a launcher started this file with python on one rank (its rank variables are set); bash runs the trainer.
import os
import sys

os.execvp("bash", ["bash", os.path.abspath(__file__), *sys.argv[1:]])
