"""Preemption: a SIGTERM (a Cloud TPU maintenance event, a scheduler's eviction, `kill`) ends
training at a step boundary, checkpointed, so that running the command again continues exactly.

One process: a signal handler notes the SIGTERM, and the loop stops after the step in flight.
Several: JAX's preemption service (started by jax.distributed; a SIGTERM on any host reaches
all) names one step at which every host stops, since a host that stopped alone would leave the
others waiting in a collective. That service needs every host to ask at every step.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Watch:
  """`with Watch() as watch:` ... `if watch.reached(step):` checkpoint and stop."""

  def __init__(self):
    self._signalled = False
    self._previous = None

  def __enter__(self) -> Watch:
    # Several processes: JAX's service catches the signal. A signal handler can only be set
    # from the main thread; elsewhere (a caller's worker thread) the default action stays.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._note)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _note(self, signum, frame) -> None:
    self._signalled = True

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step` (the same answer on every host)."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled
