#!/usr/bin/env bash
# The main job (`make run`): pretrain tiny vanilla LLaMA and tiny ParameterNet-LLaMA on the embedded Shakespeare
# corpus with the same data order and token budget (CPU, a few minutes), evaluate both zero-shot with lm-eval on the
# offline LLaMA suite (a small --limit), and print the side-by-side report (validation loss, accuracies, parameters,
# FLOPs). Everything lands in runs/main/; a second call reuses finished runs (pass --force to redo them).
# Extra arguments go to launch/compare.sh, e.g.  bash launch/main.sh --seeds 3  or  -- --train_iters 200
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export NPROC="${NPROC:-1}"
exec bash launch/compare.sh --out "${OUT:-runs/main}" --offline --limit "${LIMIT:-40}" "$@"
