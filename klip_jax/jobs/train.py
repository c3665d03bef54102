"""`klip train`: the run's data (made if absent), its caption lengths against data.max_len
(reported before the first step, so a truncating max_len is caught before hours of training),
the training loop, and the cheap evaluators every `config.eval.every` steps."""

from __future__ import annotations

import sys

import ml_collections

from klip_jax import config as config_lib
from klip_jax.data import lengths, prepare
from klip_jax.eval import periodic
from klip_jax.train import loop


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None,
          progress: bool = True) -> dict:
  """Train (or resume) a workdir; returns the last logged training metrics."""
  config_lib.validate(config)
  data = prepare.ensure(config, workdir)
  prepare.check_chip_size(config, data.data_dir)
  if progress:  # the user-facing run (process 0 of the CLI)
    print(lengths.of_split(data.data_dir, data.codec, config.data.max_len).text(), file=sys.stderr)
  return loop.train(config, workdir, data, stop_at=stop_at, progress=progress,
                    evaluate=periodic.make_hook(config, data))
