#!/usr/bin/env bash
# klip bench on one TPU VM host (v4, v5e, v5p, v6e): installs klip_jax with jax's TPU build
# (libtpu) in a fresh virtual environment, then times the train step, caption generation and
# SCIO relabelling of configs/base.py over the host's chips and prints images/s, FLOPs per
# step and MFU against the chip's datasheet bf16 peak. Usage: launch/bench_tpu.sh [CONFIG] [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-configs/base.py}"
OUT="${2:-bench_tpu.json}"
python3 -m venv .bench-venv
source .bench-venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[tpu]"
python -c "import jax; print(jax.devices())"
klip bench train caption relabel --config "$CONFIG" --json "$OUT"
