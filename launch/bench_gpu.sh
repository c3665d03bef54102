#!/usr/bin/env bash
# klip bench on one NVIDIA GPU host (A100/H100/H200), jax's CUDA 12 build.
# Usage: launch/bench_gpu.sh [CONFIG] [OUT.json]
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$(dirname "$0")/bench.sh" cuda "$@"
