"""`klip pretrain`, the main job: data + tokenizer, SCIO stages A -> B -> C (with the cheap
evaluators along the way), then the full benchmark.

With no data given it synthesises the embedded world (caption noise from the config), trains
the tokenizer, trains through the three stages, and runs the downstream benchmark
(`klip eval`), which includes what SCIO is for: how well the model's own heads find and
repair the corrupted clauses of the training captions. Results go to WORKDIR/eval/. Running it
again on the same workdir resumes where it stopped.
"""

from __future__ import annotations

import ml_collections

from klip_jax.eval import suite
from klip_jax.jobs import train as train_job
from klip_jax.train import scio


def pretrain(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None,
             progress: bool = True) -> dict | None:
  """Run (or resume) the whole job; returns the benchmark results, None if stopped early."""
  total = scio.total_steps(config.scio)
  if total:
    config.train.steps = total
  train_job.train(config, workdir, stop_at=stop_at, progress=progress, benchmark_after=True)
  if stop_at is not None and stop_at < config.train.steps:
    return None
  return suite.run(config, workdir, progress=progress)
