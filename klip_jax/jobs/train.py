"""`klip train`: the run's data (made if absent), its caption lengths against data.max_len
(reported before the first step, so a truncating max_len is caught before hours of training),
the training loop, and the cheap evaluators every `config.eval.every` steps."""

from __future__ import annotations

import sys

import ml_collections

from klip_jax import config as config_lib
from klip_jax.data import builder, lengths, prepare
from klip_jax.eval import periodic
from klip_jax.train import loop


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None,
          progress: bool = True, benchmark_after: bool = False) -> dict:
  """Train (or resume) a workdir; returns the last logged training metrics. `benchmark_after`
  (klip pretrain): the benchmark that follows reads the test split, so a dataset without one is
  refused now, not after training."""
  config_lib.validate(config)
  data = prepare.ensure(config, workdir)
  prepare.check_chip_size(config, data.data_dir)
  if benchmark_after:
    builder.require_split(data.data_dir, "test", "klip pretrain ends in the benchmark, which reads the test "
                          "split: give some of the dataset's examples split \"test\" (a manifest line's "
                          "\"split\"), or run klip train, which stops after training.")
  if progress:  # the user-facing run (process 0 of the CLI)
    print(lengths.of_split(data.data_dir, data.codec, config.data.max_len).text(), file=sys.stderr)
  return loop.train(config, workdir, data, stop_at=stop_at, progress=progress,
                    evaluate=periodic.make_hook(config, data))
