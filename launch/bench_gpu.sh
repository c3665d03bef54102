#!/usr/bin/env bash
# klip bench on one NVIDIA GPU host (A100/H100/H200): installs klip_jax with jax's CUDA 12 build
# in a fresh virtual environment, then times the train step, caption generation and SCIO
# relabelling of configs/base.py and prints images/s, FLOPs per step and MFU against the chip's
# datasheet bf16 peak. Usage: launch/bench_gpu.sh [CONFIG] [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-configs/base.py}"
OUT="${2:-bench_gpu.json}"
python3 -m venv .bench-venv
source .bench-venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[cuda]"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import jax; print(jax.devices())"
klip bench train caption relabel --config "$CONFIG" --json "$OUT"
