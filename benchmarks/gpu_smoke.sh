#!/usr/bin/env bash
# One full Step-DPO round on one GPU with a random 0.5B model and a 151,936-token vocabulary (benchmarks/gpu_smoke.py
# says what it prints). Needs a CUDA GPU and raypipe installed with the `gpu` extra; under 8 minutes on an H100/H200.
#
#   bash benchmarks/gpu_smoke.sh [--out DIR] [--peak-tflops N]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
exec "${PYTHON:-python3}" -m benchmarks.gpu_smoke "$@"
