"""Timing on a noisy machine: several contenders timed in interleaved rounds, so that a burst
of load from elsewhere hits all of them alike, and the median of the rounds reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def interleaved(contenders: Mapping[str, Callable[[], None]], *, rounds: int, warmup: int = 1) -> dict:
  """{name: fn} -> {name: median seconds per call}; each fn must block until its work is done.

  Every fn runs `warmup` times first (compilation, allocator and thread-pool start-up), then
  once per round, the contenders taking turns within each round.
  """
  if rounds < 1:
    raise ValueError(f"rounds={rounds}: time at least one round")
  for fn in contenders.values():
    for _ in range(warmup):
      fn()
  seconds: dict[str, list[float]] = {name: [] for name in contenders}
  for _ in range(rounds):
    for name, fn in contenders.items():
      start = time.perf_counter()
      fn()
      seconds[name].append(time.perf_counter() - start)
  return {name: statistics.median(s) for name, s in seconds.items()}
