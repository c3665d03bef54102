"""What a run on several processes (hosts) needs beyond one: starting `jax.distributed`, which
process writes the run's files, barriers, and moving arrays between hosts and global arrays.

The contract every multi-process path follows (a pod slice, or N processes on one machine):
  * every process runs the same program and makes the same jitted calls in the same order
    (a process that skips or adds one hangs the others in a collective);
  * inputs are either each host's own rows (`pipeline.global_batch`, the training stream) or a
    copy every host holds in full (`from_host`, evaluation arrays);
  * outputs that the host needs are fetched whole onto every host (`fetch`), so every process
    computes the same entries, metrics and reports;
  * only process 0 writes files (`is_writer`, used by `klip_jax.io`), and a process that reads
    what process 0 wrote waits for it at a barrier (`sync`) first.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Join the run's processes (before anything else touches jax).

  With no arguments jax detects the cluster itself (Cloud TPU VMs, GKE, SLURM); otherwise give
  all three (e.g. several processes on one machine: coordinator "localhost:PORT"). CPU devices
  talk through gloo, so the same code runs multi-process on CPUs (tests) as on TPUs.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id)


def is_writer() -> bool:
  """Whether this process writes the run's files: process 0 (every process holds the same
  content; one writing it avoids races on the same names)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Wait until every process arrives here (no-op in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def fetch(tree):
  """Global jax.Arrays -> numpy arrays holding ALL rows, on every host (a host's own shards
  are not enough once other hosts own some)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def from_host(tree, sharding: jax.sharding.Sharding):
  """Arrays every host holds in full -> global jax.Arrays laid out by `sharding` (each device
  takes its slice of the host copy)."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)
