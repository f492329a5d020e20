# Sourced by launch/pretrain_llama.sh and launch/train_vision.sh: what both launchers share, so that both take the
# same environment and start ranks the same way. Expects `repo` (the repository root, the current directory).
#   NPROC=N            ranks per node (default: the visible GPUs, or 1 CPU rank without a GPU)
#   HOSTFILE=FILE      several nodes over ssh/pdsh (see launch/hostfile.example)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   one launcher per node without ssh (set for you inside an srun step)
# Sets PY and DS (the venv's python and deepspeed when there is one) and TORCH_EXTENSIONS_DIR (DeepSpeed's CPU op is
# prebuilt there at install time; see Makefile).

if [ -x "$repo/.venv/bin/deepspeed" ]; then
  DS="$repo/.venv/bin/deepspeed"; PY="$repo/.venv/bin/python"
  # The venv's ninja for DeepSpeed's JIT op builds: another ninja version on PATH reads the build log's command
  # hashes as changed and rebuilds the op (1-2 min) each time the two take turns.
  export PATH="$repo/.venv/bin:$PATH"
else DS="$(command -v deepspeed || echo deepspeed)"; PY="$(command -v python3)"; fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.venv/torch_extensions}"
export PYTHONUNBUFFERED=1
_launcher_hostfile=""
trap '[ -z "$_launcher_hostfile" ] || rm -f "$_launcher_hostfile"' EXIT

launch_die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

# True when this process is already one rank: a launcher set RANK (deepspeed, torchrun, mpirun), or an srun step
# runs more tasks than nodes (one task per rank; the trainers map SLURM's task ids to ranks).
inside_launcher() {
  [ -n "${RANK:-}" ] || [ -n "${OMPI_COMM_WORLD_RANK:-}" ] \
    || [ "${SLURM_STEP_NUM_TASKS:-0}" -gt "${SLURM_STEP_NUM_NODES:-0}" ]
}

# Sets the array LAUNCHER to the DeepSpeed launcher command for this node (the user script and its arguments go
# after it), from the variables above.
deepspeed_launcher() {
  if [ -n "${SLURM_STEP_ID:-}" ] && [ -z "${NNODES:-}" ]; then
    # One srun task per node: NNODES, NODE_RANK and the rendezvous from the step (runtime/slurm.py:node_env).
    local line
    while IFS= read -r line; do [ -z "$line" ] || declare -g "$line"; done \
      < <("$PY" -m runtime.slurm node-env)
  fi
  if [ -z "${NPROC:-}" ]; then
    NPROC=$("$PY" -c 'import torch; print(torch.cuda.device_count() or 1)' 2>/dev/null || echo 1)
  fi
  [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || launch_die "NPROC=$NPROC: give the number of ranks per node, a positive integer"

  LAUNCHER=("$DS" --master_port "${MASTER_PORT:-29500}")
  if [ -n "${HOSTFILE:-}" ]; then
    [ -f "$HOSTFILE" ] || launch_die "HOSTFILE=$HOSTFILE: no such file (see launch/hostfile.example)"
    LAUNCHER+=(--hostfile "$HOSTFILE" --num_gpus "$NPROC")
  elif [ -n "${NNODES:-}" ] && [ "$NNODES" != 1 ]; then
    [[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || launch_die "NNODES=$NNODES: give the number of nodes, a positive integer"
    [[ "${NODE_RANK:-}" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] \
      || launch_die "NODE_RANK='${NODE_RANK:-}': with NNODES=$NNODES give this node's index, 0..$((NNODES - 1))"
    [ -n "${MASTER_ADDR:-}" ] || launch_die "MASTER_ADDR is required with NNODES=$NNODES: the address of node 0"
    # DeepSpeed's runner takes the node list from a hostfile even without ssh; only the slot counts and the order
    # matter (global rank = NODE_RANK x NPROC + local rank), so the names are placeholders.
    _launcher_hostfile="$(mktemp "${TMPDIR:-/tmp}/pnet-hostfile.XXXXXX")"
    local i
    for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$NPROC"; done > "$_launcher_hostfile"
    LAUNCHER+=(--hostfile "$_launcher_hostfile" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
               --num_nodes "$NNODES" --num_gpus "$NPROC")
  else
    LAUNCHER+=(--num_gpus "$NPROC")
  fi
}

# Runs the launcher command "$@" and exits with its status once every rank is gone. A stop request - TERM, INT or
# USR1 to this script or to its whole process group - is passed to the ranks as USR1: each finishes its step, saves a
# checkpoint and exits 0. The launcher runs in a session of its own (runtime/launcher_session.py), so a signal to
# this script's group does not kill DeepSpeed's runner under the ranks; it dies with this script all the same.
run_launcher() {
  local stop=0 interrupts=0 child_pid rc
  _descendants() { local c; for c in $(pgrep -P "$1" || true); do echo "$c"; _descendants "$c"; done; }
  _request_stop() {
    echo "$(basename "$0"): $1 received; every rank will checkpoint and exit" >&2
    stop=1
  }
  _interrupt() {
    interrupts=$((interrupts + 1))
    if [ "$interrupts" -ge 2 ]; then
      echo "$(basename "$0"): second interrupt: stopping now, without a checkpoint" >&2
      kill -KILL -- "-$child_pid" 2>/dev/null || true
    else
      _request_stop INT
    fi
  }
  trap '_request_stop TERM' TERM
  trap '_request_stop USR1' USR1
  trap '_interrupt' INT
  "$PY" -m runtime.launcher_session "$$" -- "$@" &
  child_pid=$!
  while kill -0 "$child_pid" 2>/dev/null; do
    # Until a rank has installed its handler it ignores USR1 (inherited), so the request repeats every second.
    if [ "$stop" = 1 ]; then
      local p
      for p in $(_descendants "$child_pid"); do kill -USR1 "$p" 2>/dev/null || true; done
    fi
    sleep 1 & wait $! 2>/dev/null || true
  done
  set +e; wait "$child_pid"; rc=$?
  exit "$rc"
}
