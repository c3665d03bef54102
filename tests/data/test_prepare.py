"""A run's tokenizer from its config: one the user named is only read, an empty setting trains
the workdir's own, and the run's data names the file it read either way."""

import os

import pytest

from klip_jax import config as config_lib
from klip_jax.data import prepare
from klip_jax.errors import TokenizerError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(data_dir: str, tokenizer: str):
  config = config_lib.load(os.path.join(REPO, "configs/tiny.py:48px"))
  config.data.update(data_dir=data_dir, tokenizer=tokenizer)
  return config


def test_a_named_tokenizer_that_does_not_exist_is_an_error_not_a_new_tokenizer(tiny_data, tmp_path):
  # A mistyped --config.data.tokenizer used to train a fresh tokenizer at the typo's path, and
  # the run went on with a vocabulary the user never chose.
  typo = tmp_path / "tokenizr.model"
  workdir = tmp_path / "run"
  with pytest.raises(TokenizerError, match=r"--config\.data\.tokenizer=.*tokenizr\.model: no such file\. .*"
                                           r"klip data tokenizer --data DIR --vocab-size V --out FILE.*"
                                           r"leave the setting empty"):
    prepare.ensure(_config(tiny_data, str(typo)), str(workdir))
  assert not typo.exists()
  assert not (workdir / "tokenizer.model").exists()


def test_run_data_names_the_tokenizer_it_read(tiny_data, tiny_tokenizer, tmp_path):
  named = prepare.ensure(_config(tiny_data, tiny_tokenizer), str(tmp_path / "named"))
  assert named.tokenizer == tiny_tokenizer
  assert not (tmp_path / "named" / "tokenizer.model").exists()  # read, nothing trained
  own = prepare.ensure(_config(tiny_data, ""), str(tmp_path / "own"))
  assert own.tokenizer == str(tmp_path / "own" / "tokenizer.model") and os.path.isfile(own.tokenizer)
  assert prepare.locate(_config(tiny_data, ""), str(tmp_path / "own")).tokenizer == own.tokenizer
