"""Input pipeline throughput: images per second the training pipeline (grain over the
ArrayRecord shards: decode, augmentation, tokenised captions) delivers as global jax.Arrays
on the mesh, per CPU core of this host, after the workers have started."""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from klip_jax.data import pipeline, prepare
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import scio
from klip_jax.train import step as step_lib


def throughput(config: ml_collections.ConfigDict, workdir: str, *, steps: int = 30, warmup: int = 3) -> dict:
  """The config's training pipeline on its data (the embedded world is built in `workdir`
  when the config names no dataset), `steps` batches timed after `warmup`."""
  data = prepare.ensure(config, workdir)
  mesh = mesh_lib.from_config(config.mesh)
  iterator = iter(scio.train_pipeline(config, data))

  def next_global():
    local = next(iterator)
    batch = pipeline.global_batch({k: np.asarray(local[k]) for k in local if k in step_lib.MODEL_INPUTS}, mesh)
    return jax.block_until_ready(batch)

  for _ in range(warmup):
    next_global()
  start = time.perf_counter()
  for _ in range(steps):
    next_global()
  seconds = time.perf_counter() - start
  cores = len(os.sched_getaffinity(0))
  images = steps * config.train.batch_size
  return {"images_per_s": images / seconds, "images_per_s_per_core": images / seconds / cores, "cores": cores,
          "workers": config.data.worker_count, "batch_size": config.train.batch_size, "steps": steps}
