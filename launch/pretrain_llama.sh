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
# Environment (all optional):
#   SIZE=tiny|1b       model preset size (llama-$SIZE / parameternet-llama-$SIZE) and training preset llm/configs/$SIZE.yaml
#   CONFIG=FILE|NAME   training preset instead of $SIZE (YAML mirroring the --key flags)
#   NPROC=N            ranks per node (default: the visible GPUs, or 1 CPU rank without a GPU)
#   HOSTFILE=FILE      several nodes over ssh/pdsh (see launch/hostfile.example)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   one launcher per node without ssh (set for you inside an srun step)
#   DS_CONFIG=NAME     ds_configs/NAME.json (must agree with --zero_stage)
#   EP=N               expert_parallel_size
#   DRY_RUN=1          print the launcher command instead of running it
# Extra --key value pairs override any training-config field (e.g. --train_iters 100 --output_dir runs/x).
# SIGTERM or SIGUSR1 to this script (or SIGUSR1 to the whole job step, as SLURM's --signal does) makes every rank
# finish its step, save a checkpoint and exit 0; rerun with --resume auto to continue.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
die() { echo "pretrain_llama.sh: error: $*" >&2; exit 2; }

# Launchers append --local_rank=N; the trainer reads the rank from the environment.
user_args=()
for arg in "$@"; do [[ "$arg" == --local_rank* ]] || user_args+=("$arg"); done
set -- "${user_args[@]+"${user_args[@]}"}"

model=llama
case "${1:-}" in
  llama|parameternet) model="$1"; shift ;;
  -*|"") ;;
  *) die "first argument must be 'llama' or 'parameternet', got '$1'" ;;
esac
size="${SIZE:-tiny}"
preset="llama-$size"; [ "$model" = parameternet ] && preset="parameternet-llama-$size"
args=(--config "${CONFIG:-$size}" --model "$preset" --output_dir "runs/$model-$size")
[ -n "${DS_CONFIG:-}" ] && args+=(--ds_config "$DS_CONFIG")
[ -n "${EP:-}" ] && args+=(--expert_parallel_size "$EP")

if [ -x "$repo/.venv/bin/deepspeed" ]; then DS="$repo/.venv/bin/deepspeed"; PY="$repo/.venv/bin/python"
else DS="$(command -v deepspeed || echo deepspeed)"; PY="$(command -v python3)"; fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.venv/torch_extensions}"
export PYTHONUNBUFFERED=1

# --- Already a rank: run the trainer in this process. -----------------------------------------------------------
slurm_tasks="${SLURM_STEP_NUM_TASKS:-0}" slurm_nodes="${SLURM_STEP_NUM_NODES:-0}"
if [ -n "${RANK:-}" ] || [ -n "${OMPI_COMM_WORLD_RANK:-}" ] || [ "$slurm_tasks" -gt "$slurm_nodes" ]; then
  exec "$PY" -u -m llm.pretrain "${args[@]}" "$@"   # llm.train.distributed maps SLURM's task ids to ranks
fi

# --- Otherwise start the DeepSpeed launcher on this node. --------------------------------------------------------
if [ -n "${SLURM_STEP_ID:-}" ] && [ "$slurm_nodes" -gt 1 ] && [ -z "${NNODES:-}" ]; then
  # One srun task per node: rendezvous on the step's first node, on a port every node derives from the job id.
  NNODES="$slurm_nodes" NODE_RANK="$SLURM_NODEID"
  hosts="$("$PY" -m llm.train.slurm hostnames "$SLURM_STEP_NODELIST")"
  MASTER_ADDR="${hosts%%$'\n'*}"
  MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
fi
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c 'import torch; print(torch.cuda.device_count() or 1)' 2>/dev/null || echo 1)
fi
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC: give the number of ranks per node, a positive integer"

hostfile_tmp=""
trap '[ -z "$hostfile_tmp" ] || rm -f "$hostfile_tmp"' EXIT
launcher=("$DS" --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || die "HOSTFILE=$HOSTFILE: no such file (see launch/hostfile.example)"
  launcher+=(--hostfile "$HOSTFILE" --num_gpus "$NPROC")
elif [ -n "${NNODES:-}" ] && [ "$NNODES" != 1 ]; then
  [[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES=$NNODES: give the number of nodes, a positive integer"
  [[ "${NODE_RANK:-}" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] \
    || die "NODE_RANK='${NODE_RANK:-}': with NNODES=$NNODES give this node's index, 0..$((NNODES - 1))"
  [ -n "${MASTER_ADDR:-}" ] || die "MASTER_ADDR is required with NNODES=$NNODES: the address of node 0"
  # DeepSpeed's runner takes the node list from a hostfile even without ssh; only the slot counts and the order
  # matter (global rank = NODE_RANK x NPROC + local rank), so the names are placeholders.
  hostfile_tmp="$(mktemp "${TMPDIR:-/tmp}/pnet-hostfile.XXXXXX")"
  for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$NPROC"; done > "$hostfile_tmp"
  launcher+=(--hostfile "$hostfile_tmp" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
             --num_nodes "$NNODES" --num_gpus "$NPROC")
else
  launcher+=(--num_gpus "$NPROC")
fi
cmd=("${launcher[@]}" llm/pretrain.py "${args[@]}" "$@")

if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi

descendants() { local child; for child in $(pgrep -P "$1" || true); do echo "$child"; descendants "$child"; done; }
signal_ranks() {
  # The launcher processes ignore USR1 (see below); the trainer ranks handle it. Until a rank has installed its
  # handler it ignores USR1 too, so the request is repeated every second until the run ends.
  local p
  for p in $(descendants "$child_pid"); do kill -USR1 "$p" 2>/dev/null || true; done
}
stop=0
request_stop() { echo "pretrain_llama.sh: $1 received; every rank will checkpoint and exit" >&2; stop=1; }
trap 'request_stop TERM' TERM
trap 'request_stop USR1' USR1
# Ignored signals stay ignored across exec: DeepSpeed's launcher processes ignore USR1 while the trainer installs
# its own handler, so a USR1 sent to the whole job step (SLURM --signal) reaches only the ranks.
( trap '' USR1; exec "${cmd[@]}" ) &
child_pid=$!
while kill -0 "$child_pid" 2>/dev/null; do
  if [ "$stop" = 1 ]; then signal_ranks; fi
  sleep 1 & wait $! 2>/dev/null || true
done
set +e; wait "$child_pid"; rc=$?
exit "$rc"
BASH ENDS
":"""
# Python: a launcher started this file with python on one rank (its rank variables are set); bash runs the trainer.
import os
import sys

os.execvp("bash", ["bash", os.path.abspath(__file__), *sys.argv[1:]])
