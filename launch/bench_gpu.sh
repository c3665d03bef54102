#!/usr/bin/env bash
# klip bench on one NVIDIA GPU host (A100/H100/H200), jax's CUDA 12 build.
# Usage: launch/bench_gpu.sh [CONFIG] [OUT.json] [klip bench options, e.g. --compare-hf]
# The train step runs 64 images per GPU jax sees: base.py's global batch of 256 on one GPU asks
# 280 GiB (an H200 holds 141; measured 2026-12-04). With --compare-hf, jax sees one GPU: HF's
# BLIP runs on one, and klip refuses to time ours on several beside it (`hf_blip.device`).
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [[ " ${*:3} " == *" --compare-hf "* ]]; then
  CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES%%,*}
fi
if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then  # jax sees these GPUs, not every GPU nvidia-smi lists
  IFS=, read -ra VISIBLE <<< "$CUDA_VISIBLE_DEVICES"
  GPUS=${#VISIBLE[@]}
else
  GPUS=$(nvidia-smi -L | wc -l)
fi
exec "$(dirname "$0")/bench.sh" cuda "${1:-configs/base.py}" "${2:-bench_cuda.json}" \
  "--config.train.batch_size=$((64 * GPUS))" "${@:3}"
