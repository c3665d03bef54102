"""`klip` as a user meets it: configs from any directory, config mistakes as one line and exit
2 before any work, and commands that restore a checkpoint never building data."""

import argparse
import os
import subprocess
import sys

import pytest

from klip_jax import cli
from klip_jax import config as config_lib
from klip_jax.data import builder


def _error_line(capsys) -> str:
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err  # one line, no traceback
  assert lines[0].startswith("klip: error: ")
  return lines[0]


def test_missing_config_file_is_one_line_and_exit_2(tmp_path, capsys):
  assert cli.main(["train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w")]) == 2
  line = _error_line(capsys)
  assert "no config file" in line and "nope.py" in line
  assert not (tmp_path / "w").exists()  # nothing was started


def test_config_problems_are_one_line_and_exit_2(tmp_path, capsys):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(arg=None)\n  return 1\n")
  cases = {
      (str(broken),): "SyntaxError",
      ("configs/tiny.py", "--config.train.stepz=5"): "stepz",
      ("configs/tiny.py", "--config.train.steps=many"): "config.train.steps",
      ("configs/tiny.py:huge",): "unknown config variant 'huge'",
      ("configs/tiny.py", "--config.train.steps=0"): "config.train.steps",
  }
  for (spec, *overrides), expected in cases.items():
    workdir = tmp_path / "w"
    assert cli.main(["train", "--config", spec, "--workdir", str(workdir), *overrides]) == 2, spec
    assert expected in _error_line(capsys), (spec, overrides)
    assert not workdir.exists()


def test_missing_config_names_the_file(tmp_path, capsys):
  cli.main(["pretrain", "--config", "configs/nosuch.py", "--workdir", str(tmp_path / "w")])
  line = _error_line(capsys)
  assert "no config file 'configs/nosuch.py'" in line and config_lib.CONFIG_DIR in line


def test_variants_and_overrides():
  assert config_lib.load("configs/demo.py").scio.mode == "offline"
  assert config_lib.load("configs/demo.py:online").scio.mode == "online"
  assert config_lib.load("configs/base.py:384").model.vision.image_size == 384
  c = config_lib.load("configs/tiny.py:48px", ["--config.train.steps=7", "--config.mesh.shape=(2,2,2)"])
  assert (c.model.vision.image_size, c.train.steps, tuple(c.mesh.shape)) == (48, 7, (2, 2, 2))


def test_default_config_does_not_depend_on_the_working_directory(tmp_path):
  code = ("from klip_jax import cli; a = cli._parser().parse_args(['pretrain', '--workdir', 'w']); "
          "import os; print(a.config, os.path.isfile(a.config))")
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
  path, exists = out.stdout.split()
  assert os.path.isabs(path) and path.endswith(os.path.join("configs", "demo.py")) and exists == "True"


@pytest.mark.parametrize("command", [["eval"], ["relabel"], ["export", "--out", "OUT"], ["finetune", "caption"]])
def test_restoring_commands_never_build_data(tmp_path, capsys, command):
  """A workdir whose run saved a config but whose data is gone: a clear error, nothing made."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config_lib.load("configs/tiny.py").to_json_best_effort())
  before = sorted(os.listdir(workdir))
  argv = [a.replace("OUT", str(tmp_path / "hf")) for a in command]
  assert cli.main([*argv, "--workdir", str(workdir)]) == 2
  assert "no dataset at" in _error_line(capsys)
  assert sorted(os.listdir(workdir)) == before  # no data/, no tokenizer.model
  assert not (tmp_path / "hf").exists()


def test_eval_without_a_run_is_a_clear_error(tmp_path, capsys):
  assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2
  assert "config.json" in _error_line(capsys)
  assert cli.main(["eval", "--workdir", str(tmp_path), "--config.eval.seed=1"]) == 2  # overrides of no saved config
  assert "config.json" in _error_line(capsys)


def test_a_path_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, capsys, tiny_data):
  (tmp_path / "notes.txt").write_text("mine")
  out = str(tmp_path / "notes.txt" / "tok.model")  # under a file: the OS refuses the folder
  assert cli.main(["data", "tokenizer", "--data", tiny_data, "--vocab-size", "300", "--out", out]) == 2
  line = _error_line(capsys)
  assert "notes.txt" in line and "a folder where one belongs" in line
  assert (tmp_path / "notes.txt").read_text() == "mine"


def test_data_synth_reads_config_data_synth(tmp_path, capsys):
  out = tmp_path / "world"
  assert cli.main(["data", "synth", "--out", str(out), "--config", "configs/tiny.py",
                   "--config.data.synth.num_train=3", "--config.data.synth.num_val=1",
                   "--config.data.synth.num_test=1", "--config.data.synth.looks=1"]) == 0
  assert "{'train': 3, 'val': 1, 'test': 1}" in capsys.readouterr().out
  settings = builder.metadata(str(out))["settings"]
  assert settings["world"]["looks"] == 1 and settings["world"]["image_size"] == 32


def _all_parsers(parser):
  yield parser
  for action in parser._actions:  # argparse keeps subcommands only here
    if isinstance(action, argparse._SubParsersAction):
      for sub in action.choices.values():
        yield from _all_parsers(sub)


def test_every_help_page_renders():
  # A bare "%" in a help string breaks `klip --help` (argparse %-formats it) but no command run.
  parsers = list(_all_parsers(cli._parser()))
  assert len(parsers) > 20  # the walk reached the nested subcommands
  for parser in parsers:
    assert parser.format_help().startswith("usage: " + parser.prog)


@pytest.mark.parametrize("command", [["bench", "train", "--config", "configs/tiny.py"],
                                     ["compile", "--config", "configs/tiny.py", "--topology", "v5e-8"]])
def test_an_unwritable_json_path_fails_before_the_work(tmp_path, capsys, monkeypatch, command):
  """`--json` was written after the benchmark (minutes) or the compiles (hours): a bad path lost them."""
  from klip_jax.bench import aot, suite

  ran = []
  monkeypatch.setattr(suite, "run", lambda *a, **k: ran.append("bench"))
  monkeypatch.setattr(aot, "compile_all", lambda *a, **k: ran.append("compile"))
  (tmp_path / "notes.txt").write_text("mine")
  for out, named in ((tmp_path / "notes.txt" / "out.json", "notes.txt"), (tmp_path, "a folder is there")):
    assert cli.main([*command, "--json", str(out)]) == 2  # under a file; a folder
    line = _error_line(capsys)
    assert named in line and "--json" in line
  assert ran == [] and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_bench_memory_meshes_are_checked_against_the_devices(capsys):
  from klip_jax.bench import aot

  assert aot.memory_meshes([], 4) == [(1, 1, 1), (1, 2, 1), (1, 4, 1)]  # FSDP over as many as there are
  assert aot.memory_meshes(["1,2,2", "fsdp"], 4) == [(1, 2, 2), (1, -1, 1)]
  with pytest.raises(config_lib.ConfigError, match=r"--mesh 1,8,1 needs 8 devices and there are 4; give "
                                                   r"--host-devices 8"):
    aot.memory_meshes(["1,8,1"], 4)
  assert cli.main(["bench", "memory", "--config", "configs/tiny.py", "--mesh", "1,x,1"]) == 2
  assert "--mesh '1,x,1': give data,fsdp,tensor sizes" in _error_line(capsys)


def test_topology_is_for_the_memory_benchmark_alone(capsys, monkeypatch):
  # `klip bench train memory --topology v5e-8` on a TPU VM timed the train step on the host CPU.
  from klip_jax.bench import suite

  monkeypatch.setattr(suite, "run", lambda *a, **k: pytest.fail("benchmarked"))
  for names in (["train", "memory"], ["caption"]):
    assert cli.main(["bench", *names, "--config", "configs/tiny.py", "--topology", "v5e-8"]) == 2
    assert "run it on its own" in _error_line(capsys)
