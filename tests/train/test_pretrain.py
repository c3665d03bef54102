"""`klip pretrain` end to end on a tiny world: stages A -> B -> C, online and offline (with a
stop at the B boundary and a resume), caption rounds, and the benchmark's output files."""

import dataclasses
import json
import os

import pytest
from PIL import Image

from klip_jax import config as config_lib
from klip_jax.data import builder
from klip_jax.errors import DatasetError
from klip_jax.eval import registry
from klip_jax.jobs import pretrain
from klip_jax.train import scio
from tests.conftest import TINY_SETTINGS


def _config(tiny_data, tiny_tokenizer, mode):
  c = config_lib.load("configs/demo.py")
  c.data.update(data_dir=tiny_data, tokenizer=tiny_tokenizer, max_len=96)
  c.model.vision.image_size = 48
  c.scio.update(mode=mode, stage_a_steps=4, stage_b_steps=2, stage_c_steps=2, relabel_batch_size=16)
  c.train.update(batch_size=8, log_every=1, ckpt_every=4)
  c.eval.update(batch_size=16, caption_steps=2, detection_steps=10, vqa_questions=4, vqa_candidates=8)
  if mode == "offline":  # the online run covers every task; this one the SCIO-specific ones
    c.eval.update(tasks="retrieval,scio_repair", random_baseline=False, every=0)
  else:  # the paper's rule (every flag rewritten) and free proofreading; the cheap evaluators at steps 3 and 6
    c.scio.update(rule="paper", field_calibration=False, candidates=False, rewrite_threshold=0.0)
    c.eval.update(tasks="all", every=3, periodic_examples=8)
  return c


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["online", "offline"])
def test_pretrain_runs_all_stages_and_the_benchmark(tiny_data, tiny_tokenizer, tmp_path, mode):
  workdir = str(tmp_path / mode)
  config = _config(tiny_data, tiny_tokenizer, mode)
  if mode == "offline":
    assert pretrain.pretrain(config, workdir, stop_at=4, progress=False) is None
    assert scio.rounds(workdir) == []  # stage B's round is written when B starts
    config = _config(tiny_data, tiny_tokenizer, mode)
  results = pretrain.pretrain(config, workdir, progress=False)
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [m["stage"] for m in lines if "eval" not in m] == [0, 0, 0, 0, 1, 1, 2, 2]
  # Stages A, B and C share one compiled train step (the offline run is two invocations: one each).
  assert {m["train_step_compilations"] for m in lines if "eval" not in m} == {1}
  evals = [m for m in lines if "eval" in m]
  if mode == "online":  # in-training evaluation at the configured steps, cheap tasks only
    assert [m["step"] for m in evals] == [3, 6]
    for m in evals:
      assert set(m["eval"]) == {"retrieval", "itm", "zeroshot_landcover", "screening"}
      assert 0 <= m["eval"]["itm"]["auc"] <= 1 and m["eval"]["retrieval"]["chance_r1"] == 1 / 8
  else:
    assert evals == []
  assert scio.rounds(workdir) == ([1, 2] if mode == "offline" else [])

  folder = os.path.join(workdir, "eval")
  saved = json.load(open(os.path.join(folder, "results.json")))
  assert saved["step"] == 8 and saved == json.loads(json.dumps(results))
  tasks = list(registry.TASKS) if mode == "online" else ["retrieval", "scio_repair"]
  assert list(saved["tasks"]) == tasks
  for name, metrics in saved["tasks"].items():
    assert "skipped" not in metrics, name
    assert all(isinstance(v, (int, float)) for v in metrics.values()), name
    assert any(k.startswith("chance") for k in metrics), f"{name} reports no chance level"
  assert saved["tasks"]["scio_repair"]["captions"] == 48
  # Screening AUC on the train captions it repaired, per field in details.json and the report.
  assert 0 <= saved["tasks"]["scio_repair"]["auc_rule"] <= 1 and saved["tasks"]["scio_repair"]["chance_auc"] == 0.5
  per_field = json.load(open(os.path.join(folder, "details.json")))["scio_repair"]["per_field"]
  assert sum(m["clauses"] for m in per_field.values()) > 0
  assert 0 <= saved["tasks"]["retrieval"]["r_mean"] <= 1
  entries = [json.loads(line) for line in open(os.path.join(folder, "relabel_train.jsonl"))]
  assert len(entries) == 48
  report = open(os.path.join(folder, "report.md")).read()
  assert all(f"| {name} |" in report for name in tasks)
  assert "SCIO before/after" in report and "cannot exceed" in report
  assert "Screening AUC per HCoT field (train split's" in report
  plots = ["retrieval.png", "training_curves.png"] + (["confusion.png"] if mode == "online" else [])
  if mode == "online":
    assert saved["tasks"]["screening"]["clauses"] > 0 and 0 <= saved["tasks"]["screening"]["auc_rule"] <= 1
  for name in plots:
    assert f"({name})" in report
    assert Image.open(os.path.join(folder, name)).format == "PNG"
  if mode == "online":
    assert set(saved["random_init"]) == set(tasks) - {"scio_repair", "screening"}
    captions = [json.loads(line) for line in open(os.path.join(folder, "captions_test.jsonl"))]
    assert len(captions) == 12 and {"reference", "greedy", "beam"} <= set(captions[0])


def test_a_dataset_without_a_test_split_is_refused_before_training(tiny_tokenizer, tmp_path):
  data_dir = str(tmp_path / "no_test")
  builder.build(data_dir, dataclasses.replace(TINY_SETTINGS, num_examples={"train": 4, "val": 4}))
  config = config_lib.load("configs/tiny.py:48px")
  config.data.update(data_dir=data_dir, tokenizer=tiny_tokenizer, max_len=96)
  workdir = tmp_path / "run"
  with pytest.raises(DatasetError, match=r"no split 'test'.*ends in the benchmark.*klip train"):
    pretrain.pretrain(config, str(workdir), progress=False)
  assert not (workdir / "checkpoints").exists()
