"""How the tests set XLA up: tests/conftest.py turns XLA's optimizing passes off and compiles
with `COMPILE_FAST_FLAGS` (the tests compile a program once and run it a few times); the tests
that run long enough to want the passes turn them back on (`optimized_xla`)."""

import contextlib
import os

_FLAG = "jax_disable_most_optimizations"

# XLA:CPU's older loop emitters instead of its MLIR fusion emitters: configs/tiny.py's train
# step (8 devices, passes off) compiled in 6.3 s instead of 8.8 s (three runs each, the same
# every time), a `klip pretrain` test ran in 51 s instead of 55 s. Their programs run slower
# (`klip bench train --config configs/demo.py`: 141 vs 148 images/s on an AMD EPYC; configs/small.py's
# vision forward + backward 1.76 s vs 1.53 s on a Xeon), so `klip` itself keeps XLA's default, and
# so does the 400-step overfit run (77 s instead of 89 s); the other `klip` processes tests start
# get these flags.
COMPILE_FAST_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def host_devices_flags(devices: int) -> str:
  """XLA_FLAGS for a test process of `devices` CPU devices that compiles as the tests do: with
  `COMPILE_FAST_FLAGS`, except inside `optimized_xla`, whose runs are long enough that the
  fusion emitters' faster programs pay for their compile time."""
  fast = "" if os.environ.get(_FLAG.upper()) == "0" else f" {COMPILE_FAST_FLAGS}"
  return f"--xla_force_host_platform_device_count={devices}{fast}"


def klip_env(devices: int) -> dict[str, str]:
  """The environment of a `klip` process a test starts: on `devices` CPU devices, compiling as
  the tests do (read when called: inside `optimized_xla`, with XLA's passes)."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": host_devices_flags(devices)}


@contextlib.contextmanager
def optimized_xla():
  """XLA's optimizing passes on, in this process and in the `klip` processes started inside
  (they read the environment); as they were afterwards."""
  import jax  # here, not above: tests/conftest.py reads this module's flags before jax is imported

  env, flag = os.environ.get(_FLAG.upper()), jax.config.values[_FLAG]
  os.environ[_FLAG.upper()] = "0"
  jax.config.update(_FLAG, False)
  try:
    yield
  finally:
    jax.config.update(_FLAG, flag)
    if env is None:
      os.environ.pop(_FLAG.upper())
    else:
      os.environ[_FLAG.upper()] = env
