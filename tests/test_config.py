"""Config checks that must fail before any work starts: train cadences that would divide by zero
after data synthesis and compilation, synthetic split sizes, and a saved config.json that cannot
be read (a ConfigError naming the file and the way out, never a json or attribute traceback)."""

import json

import pytest

from klip_jax import cli
from klip_jax import config as config_lib
from klip_jax.errors import ConfigError


@pytest.mark.parametrize("field, value", [("log_every", 0), ("ckpt_every", 0), ("keep", 0), ("ckpt_every", -5)])
def test_train_cadences_are_validated(field, value):
  c = config_lib.load("configs/tiny.py")
  c.train[field] = value
  with pytest.raises(ConfigError, match=rf"config\.train\.{field}: must be >= 1 .*got {value}\."):
    config_lib.validate(c)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_synthetic_split_sizes_are_validated(split):
  c = config_lib.load("configs/tiny.py")
  c.data.synth[f"num_{split}"] = -3
  with pytest.raises(ConfigError, match=rf"config\.data\.synth\.num_{split}: must be >= 1 .*got -3\.") as error:
    config_lib.validate(c)
  assert "lower" not in str(error.value)  # the value is too small: the fix raises it
  c.data.data_dir = "/some/built/dataset"  # a given dataset has its own sizes; data.synth is unused
  config_lib.validate(c)


def test_too_many_train_examples_says_which_way_to_change_what():
  c = config_lib.load("configs/tiny.py")
  c.data.train_examples = c.data.synth.num_train + 1
  with pytest.raises(ConfigError, match=r"lower data\.train_examples .*or raise data\.synth\.num_train"):
    config_lib.validate(c)


@pytest.mark.parametrize("content, reason", [
    ('{"model": {"dtype": "float32"}, "train": {"ste', "JSONDecodeError"),
    ("[1, 2]", "a JSON list, not an object of config sections"),
    ('{"train": 5}', "AttributeError"),
    (b"\xff\xfe\x00garbage", "UnicodeDecodeError"),
])
def test_an_unreadable_saved_config_names_the_file_and_the_fix(tmp_path, content, reason):
  path = tmp_path / "config.json"
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(ConfigError, match=r"config\.json is not a readable run config") as error:
    config_lib.load_saved(str(path))
  message = str(error.value)
  assert str(path) in message and reason in message and "--config FILE" in message and "Restore" in message


def test_eval_on_a_truncated_config_is_a_one_line_error(tmp_path, capsys):
  saved = config_lib.load("configs/tiny.py").to_json_best_effort(indent=2)
  (tmp_path / "config.json").write_text(saved[: len(saved) // 2])
  assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("klip: error: ") and "config.json is not a readable run config" in err
  assert "Traceback" not in err and json.loads(saved)  # the full file was valid: only the truncation is refused


def test_overrides_apply_to_a_runs_saved_config(tmp_path):
  """`klip eval --workdir W --config.eval.test_examples=100` (no --config): the saved run's
  settings with the overridden ones changed, not a config file's."""
  saved = config_lib.load("configs/tiny.py", ["--config.train.steps=37", "--config.mesh.shape=(2,2,2)"])
  path = tmp_path / "config.json"
  path.write_text(saved.to_json_best_effort())
  config = config_lib.load_saved(str(path), ["--config.eval.test_examples=100", "--config.scio.rewrite_threshold=3"])
  assert config.eval.test_examples == 100 and config.scio.rewrite_threshold == 3.0
  assert config.train.steps == 37 and tuple(config.mesh.shape) == (2, 2, 2)  # the run's, not configs/tiny.py's
  assert config_lib.load_saved(str(path)).eval.test_examples == saved.eval.test_examples == 0
  for bad, reason in ((["--config.eval.nope=1"], "nope"), (["--config.train.steps=many"], "many"),
                      (["--steps=3"], "unrecognised arguments")):
    with pytest.raises(ConfigError, match=reason) as error:
      config_lib.load_saved(str(path), bad)
    assert "config overrides" in str(error.value) or str(path) in str(error.value)
