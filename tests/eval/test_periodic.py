"""The in-training evaluation hook refuses, before the first step, data it could only fail on
at its first evaluation: that evaluation comes before its step's checkpoint, so every step
since the last one would be lost."""

import dataclasses

import pytest

from klip_jax import config as config_lib
from klip_jax.data import builder
from klip_jax.data.prepare import RunData
from klip_jax.data.tokenizer import TextCodec
from klip_jax.errors import DatasetError
from klip_jax.eval import periodic
from tests.conftest import TINY_SETTINGS


def test_a_dataset_without_a_val_split_is_refused_when_the_hook_is_made(tmp_path, tiny_tokenizer):
  data_dir = str(tmp_path / "train_only")  # as an ingested manifest whose lines all say "train"
  builder.build(data_dir, dataclasses.replace(TINY_SETTINGS, num_examples={"train": 4}))
  config = config_lib.load("configs/tiny.py:48px")
  config.eval.update(every=2, tasks="retrieval")
  data = RunData(data_dir, TextCodec(tiny_tokenizer, 96))
  with pytest.raises(DatasetError, match=r"no split 'val'.*in-training evaluation.*--config\.eval\.every=0"):
    periodic.make_hook(config, data)
  config.eval.update(every=0, at_steps=())
  assert periodic.make_hook(config, data) is None  # nothing to evaluate: nothing read
