"""A workdir's checkpoints continue only on the data they were trained on (the same tokenizer
and dataset, wherever it now lies) and restore only into the model they hold; a damaged one is
named with the step to resume from."""

import dataclasses
import os
import shutil

import jax
import pytest

from klip_jax import config as config_lib
from klip_jax.data import builder, prepare, tokenizer
from klip_jax.errors import CheckpointError, ConfigError
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import checkpoint
from tests.conftest import TINY_SETTINGS
from tests.data.text_cases import all_template_captions
from tests.workdir import saved_workdir


def test_a_resume_on_another_tokenizer_or_dataset_is_refused_and_names_the_setting(tmp_path, tiny_data,
                                                                                   tiny_tokenizer):
  own = prepare.RunData(tiny_data, tokenizer.TextCodec(tiny_tokenizer, 96))
  other_path = tmp_path / "other.model"
  tokenizer.train_sentencepiece([c for c, _ in all_template_captions()], 300, other_path)
  other_tokenizer = dataclasses.replace(own, codec=tokenizer.TextCodec(str(other_path), 96))
  assert other_tokenizer.codec.vocab_size != own.codec.vocab_size
  other_world = str(tmp_path / "other_world")
  builder.build(other_world, dataclasses.replace(TINY_SETTINGS, seed=TINY_SETTINGS.seed + 1))
  moved = str(tmp_path / "moved")
  shutil.copytree(tiny_data, moved)

  workdir = str(tmp_path / "run")
  checkpoint.check_data(workdir, prepare.fingerprint(other_tokenizer))  # no record (a fresh run, or an old one)
  checkpoint.record_data(workdir, prepare.fingerprint(own))
  checkpoint.check_data(workdir, prepare.fingerprint(dataclasses.replace(own, data_dir=moved)))  # moved: the same
  checkpoint.check_data(workdir, prepare.fingerprint(  # the same tokenizer at another max_len
      dataclasses.replace(own, codec=tokenizer.TextCodec(tiny_tokenizer, 64))))
  with pytest.raises(ConfigError, match=rf"another tokenizer \(pieces {own.codec.vocab_size}.*pieces "
                                        rf"{other_tokenizer.codec.vocab_size}.*--config\.data\.tokenizer"):
    checkpoint.check_data(workdir, prepare.fingerprint(other_tokenizer))
  with pytest.raises(ConfigError, match=r"another dataset .*--config\.data\.data_dir"):
    checkpoint.check_data(workdir, prepare.fingerprint(dataclasses.replace(own, data_dir=other_world)))


def _tiny_workdir(tmp_path, tiny_data, tiny_tokenizer):
  config = config_lib.load("configs/tiny.py:48px")
  config.data.update(data_dir=tiny_data, tokenizer=tiny_tokenizer, max_len=96)
  config.train.update(steps=4, batch_size=8)
  workdir = str(tmp_path / "run")
  saved_workdir(config, workdir, step=2)
  return config, workdir


def test_restoring_for_another_model_or_accumulation_names_the_setting(tmp_path, tiny_data, tiny_tokenizer):
  config, workdir = _tiny_workdir(tmp_path, tiny_data, tiny_tokenizer)
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  vocab = tokenizer.TextCodec(tiny_tokenizer, 96).vocab_size
  checkpoint.restore(config, workdir, vocab, mesh)  # as written: restores
  wider = config_lib.load_saved(f"{workdir}/config.json")
  wider.model.vision.update(width=128, mlp_dim=256)
  with pytest.raises(ConfigError, match=r"different model: model\.vision\.mlp_dim, model\.vision\.width"):
    checkpoint.restore(wider, workdir, vocab, mesh)
  accumulating = config_lib.load_saved(f"{workdir}/config.json")
  accumulating.optim.grad_accum = 2  # optax.MultiSteps: another optimizer state
  with pytest.raises(ConfigError, match=r"optim\.grad_accum"):
    checkpoint.check_resumable(accumulating, workdir)


def test_a_damaged_checkpoint_is_named_with_the_step_to_resume_from(tmp_path, tiny_data, tiny_tokenizer):
  config, workdir = _tiny_workdir(tmp_path, tiny_data, tiny_tokenizer)
  files = [p for p in (tmp_path / "run" / "checkpoints" / "2" / "state").rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  os.truncate(biggest, 1000)  # a disk that filled, a copy cut short
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  with pytest.raises(CheckpointError, match=r"checkpoints/2 cannot be restored.*delete .*checkpoints/2 to resume "
                                            r"from the start"):
    checkpoint.restore(config, workdir, tokenizer.TextCodec(tiny_tokenizer, 96).vocab_size, mesh)
