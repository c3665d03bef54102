"""The evaluator registry's task selection and declarations, eval config checks, and the
report table (no model)."""

import json

import pytest

from klip_jax import config as config_lib
from klip_jax.errors import ConfigError
from klip_jax.eval import registry, report


def test_parse_tasks():
  assert registry.parse_tasks("all") == list(registry.TASKS)
  assert registry.parse_tasks(" retrieval, vqa_count ") == ["retrieval", "vqa_count"]
  with pytest.raises(ConfigError, match="unknown eval task.*'retrival'.*retrieval"):
    registry.parse_tasks("retrival")


def test_thirteen_task_families_plus_matching_and_scio():
  assert len(registry.TASKS) == 16
  assert sum(t.startswith("vqa_") for t in registry.TASKS) == 6
  assert {"itm", "screening", "scio_repair"} <= set(registry.TASKS)


def test_cheap_evaluators_are_the_in_training_ones():
  assert registry.cheap_tasks("all") == ["retrieval", "itm", "zeroshot_landcover", "screening"]
  assert registry.cheap_tasks("captioning,itm,vqa_count") == ["itm"]  # the config still picks


def test_declared_needs():
  needs = {name: set(e.needs) for name, e in registry.REGISTRY.items()}
  # Tasks of the trained model alone: no random-init baseline is evaluated for them.
  assert {n for n, s in needs.items() if "trained" in s} == {"screening", "scio_repair"}
  assert "decoder" in needs["captioning"] and "decoder" in needs["vqa_count"]
  assert "train" not in needs["retrieval"] and "train" in needs["segmentation"]


def test_eval_config_is_validated():
  c = config_lib.load("configs/tiny.py")
  c.eval.rerank_k = 0
  with pytest.raises(ConfigError, match="eval.rerank_k"):
    config_lib.validate(c)
  c = config_lib.load("configs/tiny.py")
  c.eval.every = -1
  with pytest.raises(ConfigError, match="eval.every"):
    config_lib.validate(c)


def test_saved_config_gains_new_sections(tmp_path):
  """A run saved before a config section existed still loads, with that section's defaults."""
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
      "screening": {"auc_rule": 0.625, "auc_itc": 0.5, "auc_itm": 0.875, "chance_auc": 0.5},
      "detection": {"skipped": 1.0}},
      "random_init": {"vqa_count": {"accuracy": 0.125}}}
  table = report.table(results, {"detection": {"skipped": "no target boxes"}})
  assert "| captioning | greedy_bleu4 | 0.500 | — | 0.200 |" in table
  assert "| captioning | beam_cider | 1.500 | — | 0.750 |" in table
  assert "| vqa_count | accuracy | 0.750 | 0.125 | 0.250 |" in table
  assert "| screening | auc_itm | 0.875 | — | 0.500 |" in table
  assert "| detection | skipped: no target boxes |" in table


def test_report_screening_table_per_field():
  table = report.screening_table({
      "target.count": {"clauses": 40, "corrupted": 9, "auc_itc": 0.75, "auc_itm": 0.5, "auc_decoder": 0.875,
                       "auc_rule": 0.625},
      "target.region": {"clauses": 40, "corrupted": 0, "auc_itc": float("nan"), "auc_itm": float("nan"),
                        "auc_rule": float("nan")}}, "train split's noisy captions")
  assert table.startswith("Screening AUC per HCoT field (train split's noisy captions; chance 0.500):")
  assert "| target.count | 40 | 9 | 0.750 | 0.500 | 0.875 | 0.625 |" in table
  assert "| target.region (no chip can show it) | 40 | 0 | — | — | — | — |" in table
  skipping = report.screening_table({"target.count": {"clauses": 40, "corrupted": 9, "auc_itc": 0.75, "auc_itm": 0.5,
                                                      "auc_decoder": 0.875, "auc_rule": 0.5}}, "val",
                                    frozenset({"target.count"}))
  assert "| target.count (never flagged: scio.skip_fields) | 40 | 9 | 0.750 | 0.500 | 0.875 | 0.500 |" in skipping


def test_report_examples_and_captions_diff_show_a_removed_clause_as_removed():
  entries = [{"id": "c0", "caption": "sea is calm$two ships$near a port", "flagged": [1, 2], "dropped": [2],
              "truth": {"1": "three ships"}, "original_keyword": ["two ships", "a port"],
              "corrected_keyword": ["three ships", ""]}]
  examples = report.scio_examples(entries)
  assert "| c0 | two ships | three ships | three ships | repaired |" in examples
  assert "| c0 | near a port | (clause removed) | a port | clean, removed |" in examples
  diff = report.captions_diff(entries, truth_recorded=True, limit=5)
  assert diff[1] == ("c0  clause 2: near a port\n"
                     "    original: 'a port'  corrected: (clause removed)  true: 'a port' (was correct)")
