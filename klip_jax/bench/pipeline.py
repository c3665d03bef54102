"""Input pipeline throughput: images per second a host's grain pipeline delivers."""

from __future__ import annotations

import time

from klip_jax.data import pipeline
from klip_jax.data.tokenizer import TextCodec


def images_per_second(options: pipeline.PipelineOptions, codec: TextCodec, steps: int,
                      warmup: int = 3) -> dict:
  """Time `steps` batches after `warmup` batches (worker start-up excluded)."""
  iterator = iter(pipeline.build(options, codec))
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(iterator)
  seconds = time.perf_counter() - start
  images = steps * len(batch["index"])
  return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
          "workers": options.worker_count, "batch_size": options.batch_size}
