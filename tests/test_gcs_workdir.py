"""A gs:// workdir (an in-memory GCS, tests/fake_gcs.py) gets the same files as a local one:
config.json, metrics.jsonl, caption overlays, the tokenizer; orbax is handed the bucket path
as it is; a dataset on gs:// is refused with the fix, not left to hang inside ArrayRecord."""

import json
import os

import pytest

from klip_jax import config as config_lib
from klip_jax import io
from klip_jax.data import builder, pipeline, prepare, tokenizer
from klip_jax.errors import ConfigError, DatasetError
from klip_jax.train import checkpoint, metrics_writer, scio
from tests.data.text_cases import all_template_captions

WORKDIR = "gs://bucket/runs/demo"


def test_caption_overlays_on_gcs(fake_gcs):
  entries = [{"id": "train_0", "caption": "a $ b", "flagged": -1}, {"id": "train_1", "caption": "c", "flagged": 0}]
  assert scio.rounds(WORKDIR) == []
  path = scio.write_overlay(WORKDIR, 1, entries)
  assert path == f"{WORKDIR}/captions/round_1/overlay.jsonl"
  assert sorted(fake_gcs) == ["bucket/runs/demo/captions/round_1/overlay.jsonl"]
  with pytest.raises(Exception, match="never overwritten"):
    scio.write_overlay(WORKDIR, 1, entries)
  scio.write_overlay(WORKDIR, 2, entries[:1])
  assert scio.rounds(WORKDIR) == [1, 2]
  assert pipeline.read_overlay(path) == {e["id"]: e for e in entries}


def test_config_and_metrics_on_gcs(fake_gcs, monkeypatch):
  logdirs = []

  class Events:  # tensorboardX writes gs:// itself (with google-cloud-storage); record where
    def __init__(self, logdir):
      logdirs.append(logdir)

    def add_scalar(self, *args):
      pass

    def flush(self):
      pass

    def close(self):
      pass

  monkeypatch.setattr(metrics_writer, "SummaryWriter", Events)
  writer = metrics_writer.MetricsWriter(WORKDIR)
  writer.train(1, {"loss": 2.5})
  writer.train(2, {"loss": 2.0})
  writer.eval(2, {"retrieval": {"r1": 0.5}})
  writer.close()
  assert logdirs == [f"{WORKDIR}/logs"]
  assert io.read_jsonl(f"{WORKDIR}/metrics.jsonl") == [
      {"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}, {"step": 2, "eval": {"retrieval": {"r1": 0.5}}}]

  config = config_lib.default_config()
  io.write_text(f"{WORKDIR}/config.json", config.to_json_best_effort(indent=2))
  saved = config_lib.load_saved(f"{WORKDIR}/config.json")
  assert json.loads(saved.to_json_best_effort()) == json.loads(config.to_json_best_effort())
  checkpoint.check_resumable(config, WORKDIR)  # same model: resumable
  changed = config_lib.default_config()
  changed.model.embed_dim = config.model.embed_dim * 2
  with pytest.raises(ConfigError, match="model.embed_dim"):
    checkpoint.check_resumable(changed, WORKDIR)


def test_orbax_gets_the_bucket_path_unchanged(fake_gcs, monkeypatch, tmp_path):
  """No os.path.abspath on a remote path (it would make CWD/gs:/bucket/...); orbax writes to
  buckets itself. Local paths are still made absolute."""
  seen = []
  monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", lambda directory, **kwargs: seen.append(directory))
  config = config_lib.default_config()
  checkpoint.manager(WORKDIR, config)
  assert [os.fspath(d) for d in seen] == [f"{WORKDIR}/checkpoints"]
  assert checkpoint.init_params_path(WORKDIR) == f"{WORKDIR}/init_params"
  monkeypatch.chdir(tmp_path)
  checkpoint.manager("runs/local", config)
  assert os.fspath(seen[-1]) == str(tmp_path / "runs" / "local" / "checkpoints")


def test_tokenizer_on_gcs(fake_gcs, tmp_path):
  """Trained straight into the bucket, and loaded from it as bytes (sentencepiece's
  model_proto), encoding exactly like a local copy."""
  captions = [c for c, _ in all_template_captions()] * 4
  tokenizer.train_sentencepiece(captions, 1000, f"{WORKDIR}/tokenizer.model")
  (tmp_path / "tok.model").write_bytes(fake_gcs["bucket/runs/demo/tokenizer.model"])
  remote = tokenizer.TextCodec(f"{WORKDIR}/tokenizer.model", 32)
  local = tokenizer.TextCodec(str(tmp_path / "tok.model"), 32)
  caption, spans = all_template_captions()[0]
  assert remote.encode(caption, spans).ids.tolist() == local.encode(caption, spans).ids.tolist()
  with pytest.raises(Exception, match="no tokenizer"):
    tokenizer.TextCodec(f"{WORKDIR}/missing.model", 32)


def test_a_dataset_on_gcs_is_refused_with_the_fix(fake_gcs):
  """array_record opens shards with POSIX open(): its reader hangs on a gs:// path and its
  writer fails at the first record, so the path is refused before either runs."""
  for call in (lambda: builder.open_split("gs://bucket/data", "train"),
               lambda: builder.build("gs://bucket/data", None)):
    with pytest.raises(DatasetError, match=r"local disk on every host.*--config.data.data_dir"):
      call()
  config = config_lib.default_config()
  config.data.data_dir = ""
  with pytest.raises(DatasetError, match="local\n?.*--config.data.data_dir"):
    prepare.ensure(config, WORKDIR)
  config.data.data_dir = "gs://bucket/data"
  with pytest.raises(DatasetError, match="gcloud storage cp -r gs://bucket/data"):
    prepare.locate(config, WORKDIR)
