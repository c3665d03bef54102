"""Bad input at ingest: one line naming the manifest line, the file and the fix, exit status 2,
and nothing half-written; --skip-bad ingests the rest; interrupted builds and damaged shards."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from klip_jax import cli
from klip_jax.data import builder, ingest, prepare
from klip_jax.errors import ConfigError, DatasetError
from tests.data import geotiffs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def folder(tmp_path):
  """Two good chips (lines 1 and 2 of a manifest)."""
  (tmp_path / "chips").mkdir()
  rng = np.random.default_rng(0)
  for i in range(2):
    geotiffs.write(tmp_path / "chips" / f"{i}.tif", rng.uniform(0.1, 4.0, (32, 32)).astype(np.float32))
  return tmp_path


def _good(folder):
  return [geotiffs.entry(0, "chips/0.tif"), geotiffs.entry(1, "chips/1.tif", split="val")]


def _ingest(folder, capsys, *flags, manifest="manifest.jsonl"):
  code = cli.main(["data", "ingest", "--manifest", str(folder / manifest), "--out", str(folder / "data"), *flags])
  out, err = capsys.readouterr()
  return code, out, err


def _refused(folder, capsys, line: int, names: str, fix: str):
  """Exit 2 with one line naming manifest line `line`, the file `names` and the fix; no dataset,
  no staging folder."""
  code, _, err = _ingest(folder, capsys)
  assert code == 2, err
  assert err.count("\n") == 1 and err.startswith("klip: error: "), err
  assert f"manifest.jsonl:{line}: " in err and names in err and fix in err, err
  assert not (folder / "data").exists()
  return err.strip()


def _write_bad_image(folder, name, data, **kw):
  geotiffs.write(folder / "chips" / name, data, **kw)
  geotiffs.manifest(folder, _good(folder) + [geotiffs.entry(2, f"chips/{name}")])


def test_garbage_tiff(folder, capsys):
  (folder / "chips" / "junk.tif").write_bytes(b"GIF89a not a tiff at all" * 40)
  geotiffs.manifest(folder, _good(folder) + [geotiffs.entry(2, "chips/junk.tif")])
  _refused(folder, capsys, 3, "chips/junk.tif", "cannot be read")


def test_truncated_tiff(folder, capsys):
  path = geotiffs.write(folder / "chips" / "cut.tif", np.ones((256, 256), np.float32))
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  geotiffs.manifest(folder, _good(folder) + [geotiffs.entry(2, "chips/cut.tif")])
  _refused(folder, capsys, 3, "chips/cut.tif", "re-export it")


def test_missing_image(folder, capsys):
  geotiffs.manifest(folder, _good(folder) + [geotiffs.entry(2, "chips/absent.tif")])
  _refused(folder, capsys, 3, "chips/absent.tif", "fix the path")


def test_non_utf8_manifest(folder, capsys):
  lines = [json.dumps(e).encode() for e in _good(folder)]
  lines.insert(1, json.dumps(geotiffs.entry(5, "chips/0.tif")).replace("qingdao", "São Paulo").encode("latin-1"))
  (folder / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  _refused(folder, capsys, 2, "is not UTF-8 text (byte 0xe3", "save the manifest as UTF-8")


def test_not_json(folder, capsys):
  geotiffs.manifest(folder, _good(folder))
  with open(folder / "manifest.jsonl", "a") as f:
    f.write("{'id': 'chip9', 'image': 'chips/0.tif'}\n")
  _refused(folder, capsys, 3, "not JSON", "one JSON object per line")


def test_all_zero_image(folder, capsys):
  _write_bad_image(folder, "zero.tif", np.zeros((32, 32), np.uint16))
  _refused(folder, capsys, 3, "chips/zero.tif", "only zero pixels")


def test_all_nan_image(folder, capsys):
  _write_bad_image(folder, "nan.tif", np.full((32, 32), np.nan, np.float32))
  _refused(folder, capsys, 3, "chips/nan.tif", "no valid pixel")


def test_all_nodata_image(folder, capsys):
  _write_bad_image(folder, "fill.tif", np.full((32, 32), -9999, np.float32), nodata=-9999)
  _refused(folder, capsys, 3, "chips/fill.tif", "no valid pixel")


def test_duplicate_id_in_one_split(folder, capsys):
  geotiffs.manifest(folder, _good(folder) + [dict(geotiffs.entry(0, "chips/1.tif"))])
  _refused(folder, capsys, 3, "id 'chip0' is already used on line 1", "rename one")


def test_duplicate_id_across_splits(folder, capsys):
  geotiffs.manifest(folder, _good(folder) + [geotiffs.entry(1, "chips/0.tif", split="test")])
  _refused(folder, capsys, 3, "id 'chip1' is already used on line 2", "unique across all splits")


def test_unknown_split(folder, capsys):
  geotiffs.manifest(folder, _good(folder) + [geotiffs.entry(2, "chips/0.tif", split="tarin")])
  err = _refused(folder, capsys, 3, "split 'tarin' is not a split", "['train', 'val', 'test']")
  assert "use one of" in err


def test_chip_of_another_size(folder, capsys):
  _write_bad_image(folder, "big.tif", np.ones((64, 64), np.uint16))
  _refused(folder, capsys, 3, "chips/big.tif is 64x64 pixels but the chips are 32x32 (set by line 1)",
           "klip data tile --chip 32")


def test_chip_size_option_names_the_expected_size(folder, capsys):
  geotiffs.manifest(folder, _good(folder))
  code, _, err = _ingest(folder, capsys, "--chip-size", "48")
  assert code == 2 and "manifest.jsonl:1: image chips/0.tif is 32x32 pixels but the chips are 48x48 " \
                       "(--chip-size 48)" in err


def test_non_square_chip(folder, capsys):
  _write_bad_image(folder, "wide.tif", np.ones((32, 48), np.uint16))
  _refused(folder, capsys, 3, "chips/wide.tif is 32x48 pixels; chips must be square", "klip data tile")


def test_two_band_file_without_band(folder, capsys):
  _write_bad_image(folder, "dual.tif", np.ones((2, 32, 32), np.uint16))
  _refused(folder, capsys, 3, "chips/dual.tif has 2 bands", "\"band\": N")


def test_clause_count_that_does_not_match_the_scene_type(folder, capsys):
  line = geotiffs.entry(2, "chips/0.tif")
  line["caption"] = "$".join(line["caption"].split("$")[:7])
  line["keywords"] = line["keywords"][:7]
  geotiffs.manifest(folder, _good(folder) + [line])
  _refused(folder, capsys, 3, "the caption has 7 clauses for a target scene; give 8, one per field", "joined by")


def test_image_changed_since_the_build_is_refused_then_rebuilt(folder, capsys):
  geotiffs.manifest(folder, _good(folder))
  assert _ingest(folder, capsys)[0] == 0
  info = (folder / "data" / "klip_sar" / "1.0.0" / "dataset_info.json").read_bytes()
  assert _ingest(folder, capsys)[0] == 0  # unchanged: reused
  geotiffs.write(folder / "chips" / "1.tif", np.full((32, 32), 0.5, np.float32))
  code, _, err = _ingest(folder, capsys)
  assert code == 2 and err.count("\n") == 1
  assert "manifest.jsonl:2: image chips/1.tif changed on disk since the dataset" in err
  assert f"klip data ingest --manifest {folder / 'manifest.jsonl'} --out {folder / 'data'} --rebuild" in err
  assert (folder / "data" / "klip_sar" / "1.0.0" / "dataset_info.json").read_bytes() == info  # untouched
  assert _ingest(folder, capsys, "--rebuild")[0] == 0
  assert sorted(os.listdir(folder / "data" / "klip_sar")) == ["1.0.0"]  # no staging or old copy left
  val = builder.open_split(folder / "data", "val")
  from klip_jax.data import records
  assert (records.from_example(val[0])["image"] == 0.5).all()


def test_skip_bad_ingests_the_rest_and_says_what_it_skipped(folder, capsys):
  (folder / "chips" / "junk.tif").write_bytes(b"junk" * 100)
  geotiffs.write(folder / "chips" / "zero.tif", np.zeros((32, 32), np.uint16))
  lines = _good(folder) + [geotiffs.entry(2, "chips/junk.tif"), geotiffs.entry(0, "chips/1.tif"),
                           geotiffs.entry(3, "chips/zero.tif", split="dev")]
  geotiffs.manifest(folder, lines)
  code, out, err = _ingest(folder, capsys, "--skip-bad")
  assert code == 0, err
  assert "{'train': 1, 'val': 1}" in out and "skipped 3 bad manifest lines" in out
  for line, why in [(3, "image chips/junk.tif cannot be read"), (4, "id 'chip0' is already used on line 1"),
                    (5, "split 'dev' is not a split")]:
    assert f"manifest.jsonl:{line}: {why}" in out
  assert len(builder.open_split(folder / "data", "train")) == 1


def test_a_killed_build_leaves_nothing_that_blocks_a_rerun(folder, capsys):
  """SIGKILL in the middle of writing: no dataset appears, reading says which command to
  rerun, and the rerun removes the leftover and builds."""
  manifest = geotiffs.manifest(folder, _good(folder) + [geotiffs.entry(2, "chips/0.tif")])
  out = folder / "data"
  script = f"""
import os, signal
from klip_jax.data import builder, ingest
source = ingest.ManifestSource({manifest!r})
real = source.record
def record(split, index):
  if split == "val":
    os.kill(os.getpid(), signal.SIGKILL)
  return real(split, index)
source.record = record
builder.build({str(out)!r}, source)
"""
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                        capture_output=True)
  assert done.returncode == -signal.SIGKILL
  assert [p.startswith(".build-") for p in os.listdir(out / "klip_sar")] == [True]
  with pytest.raises(DatasetError, match=f"interrupted build .*klip data ingest --manifest {manifest} --out {out}$"):
    builder.open_split(out, "train")
  assert _ingest(folder, capsys)[0] == 0
  assert sorted(os.listdir(out / "klip_sar")) == ["1.0.0"]


def _shard(data_dir, split="train"):
  folder = data_dir / "klip_sar" / "1.0.0"
  (name,) = [n for n in os.listdir(folder) if f"-{split}.array_record" in n]
  return folder / name


def test_a_truncated_or_corrupted_shard_is_named(folder, capsys, tiny_tokenizer):
  geotiffs.manifest(folder, _good(folder) + [geotiffs.entry(2, "chips/0.tif")])
  assert _ingest(folder, capsys)[0] == 0
  shard = _shard(folder / "data")
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) // 2])
  with pytest.raises(DatasetError, match=f"shard {shard} is truncated or corrupted .*--rebuild"):
    builder.open_split(folder / "data", "train")[0]
  code = cli.main(["data", "tokenizer", "--data", str(folder / "data"), "--vocab-size", "50",
                   "--out", str(folder / "tok.model")])
  err = capsys.readouterr().err
  assert code == 2 and f"shard {shard} is truncated" in err and err.count("\n") == 1
  corrupted = bytearray(data)
  corrupted[100:400] = bytes(b ^ 0x5A for b in corrupted[100:400])
  shard.write_bytes(bytes(corrupted))
  from klip_jax.data import pipeline
  from klip_jax.data.tokenizer import TextCodec
  with pytest.raises(DatasetError, match=f"shard {shard} is truncated or corrupted"):
    next(iter(pipeline.build(pipeline.PipelineOptions(str(folder / "data"), "train", 2, train=False),
                             TextCodec(tiny_tokenizer, 96))))


def test_chips_that_do_not_match_the_model_size_are_refused_before_training(folder, capsys):
  from klip_jax import config as config_lib

  geotiffs.manifest(folder, _good(folder))
  assert _ingest(folder, capsys)[0] == 0
  config = config_lib.load(os.path.join(REPO, "configs/tiny.py:48px"))
  with pytest.raises(ConfigError, match="holds 32x32 chips but model.vision.image_size is 48; set "
                                        "--config.model.vision.image_size=32"):
    prepare.check_chip_size(config, str(folder / "data"))
  config.model.vision.image_size = 32
  prepare.check_chip_size(config, str(folder / "data"))


def test_the_manifest_is_only_ever_parsed_as_json(folder):
  """A manifest line that would run code if evaluated is just a bad line."""
  (folder / "manifest.jsonl").write_text("__import__('os').system('touch pwned')\n")
  with pytest.raises(Exception, match="not JSON"):
    ingest.ManifestSource(str(folder / "manifest.jsonl"))
  assert not (folder / "pwned").exists()


def test_fields_of_the_wrong_kind(folder, capsys):
  geotiffs.manifest(folder, _good(folder) + [geotiffs.entry(2, "chips/0.tif", geo=["Qingdao"])])
  _refused(folder, capsys, 3, "malformed line", "see klip_jax/data/ingest.py")


@pytest.mark.parametrize("nodata", ["0", True])
def test_nodata_that_is_not_a_number(folder, capsys, nodata):
  """A string "0" compared unequal to every pixel and masked nothing."""
  geotiffs.manifest(folder, _good(folder) + [geotiffs.entry(2, "chips/0.tif", nodata=nodata)])
  _refused(folder, capsys, 3, f"field 'nodata' is {nodata!r} ({type(nodata).__name__}), not a number",
           "give the fill value as a JSON number, e.g. \"nodata\": 0")


@pytest.mark.parametrize("boxes, problem", [
    ([[0.1, 0.1, 0.2, 0.3]], "row 0 = (0.1, 0.1, 0.2, 0.3) has every value in [0, 1], which looks normalised"),
    ([[2, 3, 10, 6], [-20, -20, -5, -5]], "row 1 = (-20, -20, -5, -5) is not a box inside the 32x32 image"),
    ([[500, 500, 600, 600]], "row 0 = (500, 500, 600, 600) is not a box inside the 32x32 image"),
    ([[30, 30, 10, 10]], "row 0 = (30, 30, 10, 10) is not a box inside the 32x32 image"),
], ids=["normalised", "negative", "outside", "inverted"])
def test_boxes_that_are_not_pixel_boxes_in_the_image(folder, capsys, boxes, problem):
  truth = {"boxes": boxes, "box_classes": ["cargo ship"] * len(boxes)}
  geotiffs.manifest(folder, _good(folder) + [geotiffs.entry(2, "chips/0.tif", truth=truth)])
  _refused(folder, capsys, 3, f"record 'chip2': field 'truth.boxes' {problem}", "pixel coordinates (x0, y0, x1, y1)")


def _mask(folder, name, data):
  from PIL import Image

  (folder / "masks").mkdir(exist_ok=True)
  Image.fromarray(data).save(folder / "masks" / name)
  return f"masks/{name}"


def test_landcover_values_that_are_no_class(folder, capsys):
  mask = np.full((32, 32), 1, np.uint8)
  mask[:2] = 9
  truth = {"landcover": _mask(folder, "nine.png", mask)}
  geotiffs.manifest(folder, _good(folder) + [geotiffs.entry(2, "chips/0.tif", truth=truth)])
  _refused(folder, capsys, 3, "field 'truth.landcover' holds values [9] (all values found: [1, 9])",
           "use the class ids 0 water, 1 vegetation, 2 bare, 3 urban, 4 road, 5 runway, or 255 for unknown")


def test_a_16_bit_landcover_mask_is_not_wrapped_into_classes(folder, capsys):
  mask = np.full((32, 32), 3, np.uint16)
  mask[0, 0] = 257  # cast to uint8 this was class 1
  truth = {"landcover": _mask(folder, "wide.png", mask)}
  geotiffs.manifest(folder, _good(folder) + [geotiffs.entry(2, "chips/0.tif", truth=truth)])
  _refused(folder, capsys, 3, "truth.landcover masks/wide.png holds values [257], which are no land-cover class",
           "use the class ids 0..5")


@pytest.mark.parametrize("field, value", [("looks", 2.7), ("epsg", 4326.9)])
def test_integer_geo_fields_that_are_not_whole_numbers(folder, capsys, field, value):
  line = geotiffs.entry(2, "chips/0.tif")
  line["geo"][field] = value
  geotiffs.manifest(folder, _good(folder) + [line])
  _refused(folder, capsys, 3, f"field 'geo.{field}' is {value}; it must be a whole number",
           f"truncated to {int(value)}): give the integer meant")


def test_a_changed_landcover_mask_is_refused_then_rebuilt(folder, capsys):
  from klip_jax.data import records

  name = _mask(folder, "m.png", np.full((32, 32), 1, np.uint8))  # all vegetation
  good = _good(folder)
  good[1]["truth"] = {"landcover": name}
  geotiffs.manifest(folder, good)
  assert _ingest(folder, capsys)[0] == 0
  assert _ingest(folder, capsys)[0] == 0  # unchanged: reused
  _mask(folder, "m.png", np.full((32, 32), 3, np.uint8))  # the user fixes the mask: all urban
  code, _, err = _ingest(folder, capsys)
  assert code == 2 and err.count("\n") == 1
  assert "manifest.jsonl:2: truth.landcover masks/m.png changed on disk since the dataset" in err
  assert f"klip data ingest --manifest {folder / 'manifest.jsonl'} --out {folder / 'data'} --rebuild" in err
  assert records.from_example(builder.open_split(folder / "data", "val")[0])["truth"]["dominant"] == 1
  assert _ingest(folder, capsys, "--rebuild")[0] == 0
  assert records.from_example(builder.open_split(folder / "data", "val")[0])["truth"]["dominant"] == 3


@pytest.mark.parametrize("content", [b"", b"{", b'{"name": 5}'], ids=["empty", "cut", "wrong field"])
def test_a_damaged_dataset_info_is_named_with_the_rebuild_command(folder, capsys, content):
  geotiffs.manifest(folder, _good(folder))
  assert _ingest(folder, capsys)[0] == 0
  info = folder / "data" / "klip_sar" / "1.0.0" / "dataset_info.json"
  info.write_bytes(content)
  fix = f"rebuild it: klip data ingest --manifest {folder / 'manifest.jsonl'} --out {folder / 'data'} --rebuild"
  with pytest.raises(DatasetError, match=f"the dataset at {folder / 'data'} cannot be opened: .*dataset_info.json"
                                         f".* is empty or damaged .*{fix}$"):
    builder.open_split(folder / "data", "train")
  code, _, err = _ingest(folder, capsys)  # without --rebuild: refused, naming the fix
  assert code == 2 and err.count("\n") == 1 and fix in err
  assert _ingest(folder, capsys, "--rebuild")[0] == 0
  assert len(builder.open_split(folder / "data", "train")) == 1


def test_out_that_is_a_file(folder, capsys):
  geotiffs.manifest(folder, _good(folder))
  (folder / "data").write_text("not a folder")
  code, _, err = _ingest(folder, capsys)
  assert code == 2 and err.count("\n") == 1
  assert f"the dataset folder {folder / 'data'} is not a folder; --out must be a folder" in err
  code = cli.main(["data", "ingest", "--manifest", str(folder / "manifest.jsonl"), "--out", str(folder / "data" / "x")])
  err = capsys.readouterr().err
  assert code == 2 and f"(it lies under the file {folder / 'data'}); --out must be a folder" in err
