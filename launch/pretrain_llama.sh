#!/usr/bin/env bash
# Pretrain LLaMA or ParameterNet-LLaMA through the DeepSpeed launcher.
#
#   bash launch/pretrain_llama.sh [llama|parameternet] [--key value ...]
#
# With no arguments: tiny vanilla LLaMA on the embedded Shakespeare corpus, on CPU, a few minutes on 2 cores.
# Environment (all optional):
#   SIZE=tiny|1b       model preset size (llama-$SIZE / parameternet-llama-$SIZE) and training preset llm/configs/$SIZE.yaml
#   CONFIG=FILE|NAME   training preset instead of $SIZE (YAML mirroring the --key flags)
#   NPROC=N            ranks per node (default: the visible GPUs, or 1 CPU rank without a GPU)
#   HOSTFILE=FILE      several nodes over ssh/pdsh (see launch/hostfile.example)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   one launcher per node without ssh (what the SLURM script sets)
#   DS_CONFIG=NAME     ds_configs/NAME.json (must agree with --zero_stage)
#   EP=N               expert_parallel_size
#   DRY_RUN=1          print the command instead of running it
# Extra --key value pairs override any training-config field (e.g. --train_iters 100 --output_dir runs/x).
# SIGTERM or SIGUSR1 to this script (or SIGUSR1 to the whole job step, as SLURM's --signal does) makes every rank
# finish its step, save a checkpoint and exit 0; rerun with --resume auto to continue.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

model=llama
case "${1:-}" in
  llama|parameternet) model="$1"; shift ;;
  -*|"") ;;
  *) echo "error: first argument must be 'llama' or 'parameternet', got '$1'" >&2; exit 2 ;;
esac
size="${SIZE:-tiny}"
preset="llama-$size"; [ "$model" = parameternet ] && preset="parameternet-llama-$size"
config="${CONFIG:-$size}"

if [ -x "$repo/.venv/bin/deepspeed" ]; then DS="$repo/.venv/bin/deepspeed"; PY="$repo/.venv/bin/python"
else DS="$(command -v deepspeed)"; PY="$(command -v python3)"; fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.venv/torch_extensions}"
export PYTHONUNBUFFERED=1

if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c 'import torch; print(torch.cuda.device_count() or 1)' 2>/dev/null || echo 1)
fi

launcher=("$DS")
if [ -n "${HOSTFILE:-}" ]; then
  launcher+=(--hostfile "$HOSTFILE" --num_gpus "$NPROC")
elif [ -n "${NNODES:-}" ] && [ "${NNODES}" -gt 1 ]; then
  launcher+=(--no_ssh --num_nodes "$NNODES" --node_rank "${NODE_RANK:?NODE_RANK is required with NNODES>1}"
             --master_addr "${MASTER_ADDR:?MASTER_ADDR is required with NNODES>1}" --num_gpus "$NPROC")
else
  launcher+=(--num_gpus "$NPROC")
fi
launcher+=(--master_port "${MASTER_PORT:-29500}")

args=(--config "$config" --model "$preset" --output_dir "runs/$model-$size")
[ -n "${DS_CONFIG:-}" ] && args+=(--ds_config "$DS_CONFIG")
[ -n "${EP:-}" ] && args+=(--expert_parallel_size "$EP")
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
