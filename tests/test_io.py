"""klip_jax.io on a local disk and on gs:// (an in-memory GCS, tests/fake_gcs.py): atomic
writes, appends, and local stand-ins for libraries that only take local files."""

import fsspec
import pytest

from klip_jax import io
from klip_jax.errors import ConfigError


def test_writes_and_reads_on_gcs(fake_gcs):
  io.write_json("gs://bucket/run/config.json", {"a": 1})
  io.write_jsonl("gs://bucket/run/rows.jsonl", [{"i": 0}, {"i": 1}])
  io.write_bytes("gs://bucket/run/tokenizer.model", b"\x00proto")
  assert io.read_json("gs://bucket/run/config.json") == {"a": 1}
  assert io.read_jsonl("gs://bucket/run/rows.jsonl") == [{"i": 0}, {"i": 1}]
  assert io.read_bytes("gs://bucket/run/tokenizer.model") == b"\x00proto"
  io.write_json("gs://bucket/run/config.json", {"a": 2})  # replaced
  assert io.read_json("gs://bucket/run/config.json") == {"a": 2}
  # Objects only: no temporary names are left behind, no folder markers were made.
  assert sorted(fake_gcs) == ["bucket/run/config.json", "bucket/run/rows.jsonl", "bucket/run/tokenizer.model"]


def test_a_failed_write_leaves_the_old_object_on_gcs(fake_gcs):
  io.write_text("gs://bucket/run/report.md", "old")
  with pytest.raises(RuntimeError), io.atomic_path("gs://bucket/run/report.md") as tmp:
    with tmp.open("w") as f:
      f.write("half")
    raise RuntimeError("crash")
  assert io.read_text("gs://bucket/run/report.md") == "old"
  assert sorted(fake_gcs) == ["bucket/run/report.md"]


def test_a_folder_is_replaced_whole_on_gcs(fake_gcs):
  for version in ("a", "b"):
    with io.atomic_path("gs://bucket/run/export", folder=True) as tmp:
      (tmp / version).write_text(version)
  assert sorted(fake_gcs) == ["bucket/run/export/b"]


def test_a_file_is_never_written_over_a_folder(tmp_path):
  """`klip bench ... --json results` where results/ is the user's folder: the file write replaced
  the folder, deleting what it held."""
  (tmp_path / "results").mkdir()
  (tmp_path / "results" / "mine.txt").write_text("mine")
  for write in (lambda: io.write_json(tmp_path / "results", {"a": 1}), lambda: io.write_text(tmp_path / "results", "")):
    with pytest.raises(IsADirectoryError, match="give a file's path"):
      write()
  assert (tmp_path / "results" / "mine.txt").read_text() == "mine"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no temporary file left beside it


def test_append_jsonl_keeps_every_line_on_gcs(fake_gcs):
  """GCS cannot append (gcsfs, like the fake, turns "a" into "w"): a plain append would keep
  only the last line."""
  for step in range(3):
    io.append_jsonl("gs://bucket/run/metrics.jsonl", {"step": step})
  assert io.read_jsonl("gs://bucket/run/metrics.jsonl") == [{"step": 0}, {"step": 1}, {"step": 2}]


def test_append_jsonl_locally(tmp_path):
  for step in range(2):
    io.append_jsonl(tmp_path / "metrics.jsonl", {"step": step})
  assert io.read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 0}, {"step": 1}]


def test_local_stand_ins_upload_and_download(fake_gcs, tmp_path):
  with io.local_atomic_path("gs://bucket/out", folder=True) as local:
    assert not io.is_remote(local)  # a local-only writer (safetensors) can write here
    (local / "retrieval").mkdir(parents=True)
    (local / "retrieval" / "model.safetensors").write_bytes(b"weights")
  assert fake_gcs == {"bucket/out/retrieval/model.safetensors": b"weights"}
  with io.local_copy("gs://bucket/out") as local:
    assert not io.is_remote(local)
    assert (local / "retrieval" / "model.safetensors").read_bytes() == b"weights"
  with io.local_copy("gs://bucket/missing") as local:
    assert not local.exists()
  with io.local_copy(tmp_path) as local:  # a local path is used in place
    assert local == tmp_path


def test_resolve_keeps_remote_paths_and_makes_local_ones_absolute(fake_gcs, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  assert str(io.resolve("gs://bucket/run")) == "gs://bucket/run"
  assert str(io.resolve("run")) == str(tmp_path / "run")


def test_gs_without_a_gcs_filesystem_names_the_extra(monkeypatch):
  monkeypatch.setenv("EPATH_USE_TF", "false")

  def missing(protocol):
    raise ImportError("Install gcsfs to access Google Storage")

  monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
  with pytest.raises(ConfigError, match=r"pip install -e \"\.\[gcs\]\""):
    io.write_text("gs://bucket/run/config.json", "{}")
