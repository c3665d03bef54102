#!/usr/bin/env bash
# klip bench on one TPU VM host (v4, v5e, v5p, v6e), jax's TPU build (libtpu).
# Usage: launch/bench_tpu.sh [CONFIG] [OUT.json] [klip bench options]
set -euo pipefail
exec "$(dirname "$0")/bench.sh" tpu "$@"
