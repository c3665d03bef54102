#!/usr/bin/env bash
# klip bench on one accelerator host: installs klip_jax with the jax build of EXTRA (tpu or
# cuda) in a fresh virtual environment, then times the train step, caption generation and
# SCIO relabelling of CONFIG and prints images/s, FLOPs per step and MFU against the chip's
# datasheet bf16 peak. Usage: launch/bench.sh EXTRA [CONFIG] [OUT.json] [klip bench options...]
# (launch/bench_tpu.sh and launch/bench_gpu.sh call it). With --compare-hf among the options,
# HF's BLIP in PyTorch is timed beside it (the export extra brings torch and transformers).
set -euo pipefail
EXTRA="$1"
CONFIG="${2:-configs/base.py}"
OUT="$(realpath -m "${3:-bench_${EXTRA}.json}")"  # where the caller is, not the repository
if [[ -f "${CONFIG%%:*}" ]]; then CONFIG="$(realpath "${CONFIG%%:*}")${CONFIG#"${CONFIG%%:*}"}"; fi
shift $(( $# < 3 ? $# : 3 ))
cd "$(dirname "$0")/.."
if ! python3 -m venv .bench-venv; then
  # Debian and Ubuntu images (TPU VMs, many GPU hosts) ship python3 without venv's ensurepip.
  SUDO=$([[ $(id -u) == 0 ]] || echo sudo)
  $SUDO apt-get update -q && $SUDO apt-get install -y -q python3-venv
  rm -rf .bench-venv && python3 -m venv .bench-venv
fi
source .bench-venv/bin/activate
python -m pip install -q --upgrade pip
EXTRAS="$EXTRA"
if [[ " $* " == *" --compare-hf "* ]]; then EXTRAS="$EXTRA,export"; fi
python -m pip install -q -e ".[${EXTRAS}]"
python -c "import jax; print(jax.devices())"
klip bench train caption relabel --config "$CONFIG" --json "$OUT" "$@"
