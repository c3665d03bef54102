"""The benchmark's task selection, config checks, CLI errors and report table (no model)."""

import pytest

from klip_jax import cli
from klip_jax import config as config_lib
from klip_jax.errors import ConfigError
from klip_jax.eval import benchmark, report


def test_parse_tasks():
  assert benchmark.parse_tasks("all") == list(benchmark.TASKS)
  assert benchmark.parse_tasks(" retrieval, vqa_count ") == ["retrieval", "vqa_count"]
  with pytest.raises(ConfigError, match="unknown eval task.*'retrival'.*retrieval"):
    benchmark.parse_tasks("retrival")


def test_thirteen_task_families_and_scio():
  assert len(benchmark.TASKS) == 14 and benchmark.TASKS[-1] == "scio_repair"
  assert sum(t.startswith("vqa_") for t in benchmark.TASKS) == 6


def test_eval_config_is_validated():
  c = config_lib.load("configs/tiny.py")
  c.eval.rerank_k = 0
  with pytest.raises(ConfigError, match="eval.rerank_k"):
    config_lib.validate(c)


def test_cli_eval_without_a_run_is_a_clear_error(tmp_path, capsys):
  assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2
  assert "config.json" in capsys.readouterr().err
  assert cli.main(["eval", "--workdir", str(tmp_path), "--config.eval.seed=1"]) == 2
  assert "need --config" in capsys.readouterr().err


def test_saved_config_gains_new_sections(tmp_path):
  """A run saved before a config section existed still loads, with that section's defaults."""
  import json

  saved = json.loads(config_lib.load("configs/tiny.py").to_json_best_effort())
  del saved["eval"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  c = config_lib.load_saved(str(tmp_path / "config.json"))
  assert c.model.vision.width == 64 and c.eval.rerank_k == config_lib.default_config().eval.rerank_k
  assert isinstance(c.mesh.shape, tuple)


def test_report_table_rows_baseline_and_chance():
  results = {"step": 5, "tasks": {
      "captioning": {"greedy_bleu4": 0.5, "greedy_cider": 1.25, "beam_bleu4": 0.6, "beam_cider": 1.5,
                     "chance_bleu4": 0.2, "chance_cider": 0.75},
      "vqa_count": {"accuracy": 0.75, "chance_accuracy": 0.25},
      "detection": {"skipped": 1.0}},
      "random_init": {"vqa_count": {"accuracy": 0.125}}}
  table = report.table(results, {"detection": {"skipped": "no target boxes"}})
  assert "| captioning | greedy_bleu4 | 0.500 | — | 0.200 |" in table
  assert "| captioning | beam_cider | 1.500 | — | 0.750 |" in table
  assert "| vqa_count | accuracy | 0.750 | 0.125 | 0.250 |" in table
  assert "| detection | skipped: no target boxes |" in table
