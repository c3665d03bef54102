"""`klip pretrain` end to end on a tiny world: stages A -> B -> C, online and offline (with a
stop at the B boundary and a resume), caption rounds, evaluation files."""

import json
import os

import pytest

from klip_jax import config as config_lib
from klip_jax.train import pretrain, scio


def _config(tiny_data, tiny_tokenizer, mode):
  c = config_lib.load("configs/demo.py")
  c.data.update(data_dir=tiny_data, tokenizer=tiny_tokenizer, max_len=96)
  c.model.vision.image_size = 48
  c.scio.update(mode=mode, stage_a_steps=4, stage_b_steps=2, stage_c_steps=2, relabel_batch_size=16)
  c.train.update(batch_size=8, log_every=1, ckpt_every=4)
  return c


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_pretrain_runs_all_stages_and_evaluates(tiny_data, tiny_tokenizer, tmp_path, mode):
  workdir = str(tmp_path / mode)
  config = _config(tiny_data, tiny_tokenizer, mode)
  if mode == "offline":
    assert pretrain.pretrain(config, workdir, stop_at=4, progress=False) is None
    assert scio.rounds(workdir) == []  # stage B's round is written when B starts
    config = _config(tiny_data, tiny_tokenizer, mode)
  results = pretrain.pretrain(config, workdir, progress=False)
  stages = [json.loads(line)["stage"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert stages == [0, 0, 0, 0, 1, 1, 2, 2]
  assert scio.rounds(workdir) == ([1, 2] if mode == "offline" else [])
  summary = json.load(open(os.path.join(workdir, "eval", "pretrain_summary.json")))
  assert summary["step"] == 8 and summary == json.loads(json.dumps(results))
  assert summary["repair"]["captions"] == 48
  assert 0 <= summary["retrieval"]["r_mean"] <= 1
  assert "screening precision" in pretrain.summary_table(results)
