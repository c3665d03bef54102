"""`klip train`: the run's data (made if absent), the training loop, and the cheap evaluators
every `config.eval.every` steps."""

from __future__ import annotations

import ml_collections

from klip_jax import config as config_lib
from klip_jax.data import prepare
from klip_jax.eval import periodic
from klip_jax.train import loop


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None,
          progress: bool = True) -> dict:
  """Train (or resume) a workdir; returns the last logged training metrics."""
  config_lib.validate(config)
  data = prepare.ensure(config, workdir)
  prepare.check_chip_size(config, data.data_dir)
  return loop.train(config, workdir, data, stop_at=stop_at, progress=progress,
                    evaluate=periodic.make_hook(config, data))
