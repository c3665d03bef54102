"""XLA's optimizing passes for the tests that run long enough to want them: tests/conftest.py
turns them off for the rest, which compile a program once and run it a few times."""

import contextlib
import os

import jax

_FLAG = "jax_disable_most_optimizations"


@contextlib.contextmanager
def optimized_xla():
  """XLA's optimizing passes on, in this process and in the `klip` processes started inside
  (they read the environment); as they were afterwards."""
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
