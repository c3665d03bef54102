"""The TFDS ArrayRecord builder: round trip, statistics, refusal, and interrupted builds."""

import errno
import os
import tempfile

import numpy as np
import pytest

from klip_jax.data import builder, records, world
from klip_jax.errors import DatasetError
from tests.conftest import TINY_SETTINGS


def test_splits_hold_the_synthesised_records(tiny_data):
  for split, n in TINY_SETTINGS.num_examples.items():
    source = builder.open_split(tiny_data, split)
    assert len(source) == n
    by_id = {}
    for i in range(n):
      r = records.from_example(source[i])
      records.validate_record(r)
      by_id[r["id"]] = r
    assert len(by_id) == n
    expected = builder.synth_record(TINY_SETTINGS, split, 5)
    stored = by_id[expected["id"]]
    assert np.array_equal(stored["image"], expected["image"])
    assert stored["caption"] == expected["caption"]
    assert stored["truth"]["true_keywords"] == expected["truth"]["true_keywords"]
    assert stored["geo"]["lon"] == expected["geo"]["lon"]  # float64 geo-referencing kept exactly
    assert stored["geo"]["geotransform"].tolist() == expected["geo"]["geotransform"].tolist()


def test_metadata_holds_train_db_statistics(tiny_data):
  source = builder.open_split(tiny_data, "train")
  db = np.concatenate([
      20 * np.log10(np.maximum(records.from_example(source[i])["image"].astype(np.float64), 1)).ravel()
      for i in range(len(source))])
  meta = builder.metadata(tiny_data)
  assert meta["db_mean"] == pytest.approx(db.mean(), rel=1e-5)
  assert meta["db_std"] == pytest.approx(db.std(), rel=1e-4)


def test_rebuilding_with_other_settings_is_refused(tiny_data):
  other = builder.SynthSettings({"train": 4}, seed=99)
  with pytest.raises(DatasetError, match="other settings"):
    builder.build(tiny_data, other)
  builder.build(tiny_data, TINY_SETTINGS)  # identical settings: reused


def test_a_dataset_of_another_world_generator_is_not_reused(tiny_data, monkeypatch):
  # The same settings make other chips under another generator (hills with relief since 2): a
  # dataset built by the older code was reused as if it were the new world.
  assert builder.metadata(tiny_data)["settings"]["generator"] == world.GENERATOR_VERSION
  monkeypatch.setattr(world, "GENERATOR_VERSION", world.GENERATOR_VERSION + 1)
  with pytest.raises(DatasetError, match="other settings.*'generator'"):
    builder.build(tiny_data, TINY_SETTINGS)


def test_missing_dataset_and_split_errors(tmp_path, tiny_data):
  with pytest.raises(DatasetError, match="klip data synth --out"):
    builder.open_split(tmp_path / "nothing", "train")
  with pytest.raises(DatasetError, match="no split 'dev'"):
    builder.open_split(tiny_data, "dev")


def test_interrupted_build_leaves_no_complete_looking_split(tmp_path, monkeypatch):
  settings = builder.SynthSettings({"train": 6, "val": 6}, seed=1, world=TINY_SETTINGS.world)
  real = builder.synth_record

  def failing(settings_, split, index):
    if split == "val" and index == 3:
      raise KeyboardInterrupt("simulated interruption")
    return real(settings_, split, index)

  monkeypatch.setattr(builder, "synth_record", failing)
  with pytest.raises(KeyboardInterrupt):
    builder.build(tmp_path, settings)
  written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
  assert not [f for f in written if f.endswith("dataset_info.json")]
  assert not [f for f in written if "array_record" in f and "incomplete" not in f]
  with pytest.raises(DatasetError, match="no finished klip dataset"):
    builder.open_split(tmp_path, "train")
  monkeypatch.setattr(builder, "synth_record", real)
  builder.build(tmp_path, settings)
  assert len(builder.open_split(tmp_path, "val")) == 6


def test_the_synthetic_world_is_still_stored_as_uint16_png(tiny_data):
  """Float storage is for calibrated data only: synthetic chips keep their lossless uint16 PNG."""
  source = builder.open_split(tiny_data, "train")
  assert source[0]["image"][:8] == b"\x89PNG\r\n\x1a\n"
  assert records.from_example(source[0])["image"].dtype == np.uint16
  assert builder.metadata(tiny_data)["image_shape"] == [48, 48]


def _split_bytes(data_dir, split):
  source = builder.open_split(data_dir, split)
  return [bytes(source[i]["id"]) + bytes(source[i]["image"]) + bytes(source[i]["caption"]) for i in range(len(source))]


def test_a_split_spilled_past_the_shuffle_buffer_builds_without_tensorflow_and_equals_the_in_memory_one(
    tmp_path, monkeypatch):
  """TFDS shuffles up to 1 GB in memory and spills the rest to bucket files through
  tf.io.gfile, which needs TensorFlow (not installed: TFDS's own bucket fails here). The buffer
  is made smaller than one record, so every record goes through the spill files, and the soft
  open-file limit is set too low for them: the build raises it, then puts it back."""
  import resource

  from tensorflow_datasets.core import shuffle

  settings = builder.SynthSettings({"train": 5, "val": 2}, seed=2, world=TINY_SETTINGS.world)
  builder.build(tmp_path / "memory", settings)
  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 100)
  opened = []
  real_open = builder._open_bucket
  monkeypatch.setattr(builder, "_open_bucket", lambda path: opened.append(path) or real_open(path))
  # The build raises the soft limit toward the hard one; 7 buckets fit under any hard limit.
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  low = len(os.listdir("/proc/self/fd")) + 3  # too few for the shards and the buckets
  resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
  try:
    builder.build(tmp_path / "spilled", settings)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (low, hard)  # restored after the build
  finally:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
  assert len(opened) == 5 + 2  # every record spilled (into a bucket of its own: 7 keys, 1,000 buckets)
  for split in ("train", "val"):
    assert _split_bytes(tmp_path / "spilled", split) == _split_bytes(tmp_path / "memory", split)
  assert not list((tmp_path / "spilled" / builder.NAME).glob(".build-*"))  # buckets gone with staging
  assert shuffle._Bucket is not builder._LocalBucket  # TFDS's own bucket is back after the build


def test_running_out_of_open_files_while_spilling_names_the_limit(tmp_path, monkeypatch):
  def no_more_files(*args, **kwargs):
    raise OSError(errno.EMFILE, "Too many open files")

  monkeypatch.setattr("builtins.open", no_more_files)
  with pytest.raises(DatasetError, match="ulimit -n 2000"):
    builder._open_bucket(tmp_path / "bucket_000.tmp")


def test_a_build_leaves_nothing_in_the_temp_folder(tmp_path, monkeypatch):
  """TFDS's DatasetInfo makes an empty temp folder per builder started before its data exists."""
  scratch = tmp_path / "tmp"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  builder.build(tmp_path / "data", builder.SynthSettings({"train": 2}, seed=1, world=TINY_SETTINGS.world))
  assert len(builder.open_split(tmp_path / "data", "train")) == 2
  assert not list(scratch.iterdir())


def test_a_damaged_dataset_is_named_and_rebuilt(tmp_path):
  settings = builder.SynthSettings({"train": 2}, seed=1, world=TINY_SETTINGS.world)
  builder.build(tmp_path, settings)
  (tmp_path / "klip_sar" / "1.0.0" / "dataset_info.json").write_text("")
  fix = f"rebuild it: klip data synth --out {tmp_path} --rebuild with the run's --config"
  with pytest.raises(DatasetError, match=f"cannot be opened: .* is empty or damaged \\(ParseError: .*{fix}"):
    builder.open_split(tmp_path, "train")
  with pytest.raises(DatasetError, match=fix):
    builder.build(tmp_path, settings)
  (tmp_path / "klip_sar" / "1.0.0" / "metadata.json").write_text("{")  # the settings are lost too
  with pytest.raises(DatasetError, match=f"rebuild it: klip data ingest --manifest M --out {tmp_path} --rebuild "
                                         f"\\(ingested chips\\), or klip data synth --out {tmp_path} --rebuild"):
    builder.open_split(tmp_path, "train")
  builder.build(tmp_path, settings, rebuild=True)
  assert len(builder.open_split(tmp_path, "train")) == 2
  assert sorted(os.listdir(tmp_path / "klip_sar")) == ["1.0.0"]


def test_a_data_dir_that_is_a_file_is_refused_before_any_chip_is_made(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("")
  monkeypatch.setattr(builder, "synth_record", lambda *a: pytest.fail("a chip was made"))
  with pytest.raises(DatasetError, match=f"the dataset folder {tmp_path / 'file'} is not a folder; --out must"):
    builder.build(tmp_path / "file", builder.SynthSettings({"train": 2}, world=TINY_SETTINGS.world))
  with pytest.raises(DatasetError, match=f"{tmp_path / 'file' / 'd'} is not a folder \\(it lies under the file "):
    builder.build(tmp_path / "file" / "d", builder.SynthSettings({"train": 2}, world=TINY_SETTINGS.world))
