"""Counting XLA compilations: a steady-state step that recompiles is the commonest silent
slowdown in JAX (a Python scalar that changes, a shape that drifts, a new closure), so the
benchmark and the training log report how many compilations happened.

`Counter` listens to the backend-compile event jax.monitoring records for every compilation
(an executable built from a cache hit is not counted) while it is active.
"""

from __future__ import annotations

import collections

import jax

# The event jax records around each XLA backend compilation (jax._src.dispatch).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Counter:
  """`with Counter() as c: ...` -> c.count compilations, c.by_name per jitted function name."""

  def __init__(self):
    self.by_name: collections.Counter = collections.Counter()

  @property
  def count(self) -> int:
    return sum(self.by_name.values())

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del duration
    if event == COMPILE_EVENT:
      self.by_name[kwargs.get("fun_name", "?")] += 1

  def __enter__(self) -> Counter:
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)
