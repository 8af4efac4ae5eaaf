#!/usr/bin/env bash
# GPU check: L3M steps on a randomly initialised ~1B-parameter Llama (bf16, activation checkpointing) on one GPU.
# Prints step time, tokens/s, the share of time in generation and peak memory; stops after 8 minutes.
#   scripts/gpu_check.sh                 # on a machine with a CUDA GPU
#   scripts/gpu_check.sh --tiny          # a 2-layer model on the CPU: checks the script itself
# Extra arguments go to scripts/gpu_check.py (--steps, --prompts, --k, --max-new-tokens, --out, --tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export TOKENIZERS_PARALLELISM=false
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" scripts/gpu_check.py "$@"
