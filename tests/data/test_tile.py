"""`klip data tile`: whole scenes -> chip GeoTIFFs with their own geotransforms, nodata chips
skipped, a manifest stub; the chips ingest."""

import json
import os

import numpy as np
import pyproj
import pytest
import rasterio
from rasterio.transform import from_origin

from klip_jax import cli
from klip_jax.data import builder, ingest, records, tile
from klip_jax.errors import RecordError
from tests.data import geotiffs

SCENES = {"utm": geotiffs.UTM, "wgs84": geotiffs.WGS84,
          "polar": ("EPSG:3031", from_origin(-1200000.0, 800000.0, 10.0, 10.0))}  # Antarctic stereographic


def _scene(path, crs_transform, dtype=np.float32, size=(80, 72)):
  """A scene with distinct values per pixel and a nodata block covering its top-left corner."""
  rng = np.random.default_rng(0)
  data = rng.uniform(0.01, 8.0, size).astype(dtype) if dtype != np.complex64 else \
      (rng.uniform(0.01, 8.0, size) * np.exp(1j * rng.uniform(0, 6.28, size))).astype(np.complex64)
  data[:20, :20] = -9999
  return geotiffs.write(path, data, crs_transform, nodata=-9999), data


@pytest.mark.parametrize("crs", sorted(SCENES))
def test_chips_carry_their_own_geotransform_and_the_scene_pixels(tmp_path, crs):
  path, data = _scene(tmp_path / "scene.tif", SCENES[crs])
  done = tile.tile(path, 16, 12, str(tmp_path / "out"), max_nodata=0.5)
  # Hand count: rows 0, 12, ..., 60 (6) x cols 0, 12, ..., 48 (5) = 30 windows; the windows
  # over half nodata are those whose 16x16 square overlaps the 20x20 block by more than 128 px.
  expected, skipped = [], 0
  for r in range(0, 80 - 16 + 1, 12):
    for c in range(0, 72 - 16 + 1, 12):
      overlap = max(0, min(20, r + 16) - r) * max(0, min(20, c + 16) - c)
      if overlap > 128:
        skipped += 1
      else:
        expected.append((r, c))
  assert (done.chips, done.skipped_nodata, done.value) == (len(expected), skipped, "amplitude")
  assert skipped == 1  # only the (0, 0) window: 256 of 256 px nodata; (0, 12) has 16 x 8 = 128
  lines = [json.loads(line) for line in open(tmp_path / "out" / "scene.jsonl")]
  assert [x["id"] for x in lines] == [f"scene_r{r:06d}_c{c:06d}" for r, c in expected]
  with rasterio.open(path) as scene:
    to_lonlat = pyproj.Transformer.from_crs(scene.crs.to_wkt(), 4326, always_xy=True)
    for line, (r, c) in zip(lines, expected):
      assert line["split"] == "train" and line["value"] == "amplitude" and "caption" not in line
      with rasterio.open(tmp_path / "out" / line["image"]) as chip:
        assert chip.crs == scene.crs and chip.nodata == -9999 and chip.shape == (16, 16)
        assert np.array_equal(chip.read(1), data[r:r + 16, c:c + 16])
        for corner in [(0, 0), (16, 0), (0, 16), (16, 16), (7.5, 3.25)]:
          x, y = chip.transform @ corner  # the chip's pixel corner in the CRS ...
          sx, sy = scene.transform @ (c + corner[0], r + corner[1])  # ... is the scene's
          assert (x, y) == pytest.approx((sx, sy), abs=1e-9)
          lon, lat = to_lonlat.transform(x, y)
          slon, slat = to_lonlat.transform(sx, sy)
          assert (lon, lat) == pytest.approx((slon, slat), abs=1e-12)
        # and back: the scene pixel of the chip's lon/lat centre is the window's centre
        lon, lat = to_lonlat.transform(*(chip.transform @ (8, 8)))
        x, y = to_lonlat.transform(lon, lat, direction="INVERSE")
        col, row = ~scene.transform @ (x, y)
        assert (col, row) == pytest.approx((c + 8, r + 8), abs=1e-6)


def test_tiled_db_and_complex_scenes_ingest_with_the_scene_value_type(tmp_path):
  """The value type is the scene's: a dB chip without negative values is still dB."""
  db = np.full((32, 64), 3.0, np.float32)
  db[:, 32:] = -12.0  # only the right-hand chip has negative values
  geotiffs.write(tmp_path / "db.tif", db)
  done = tile.tile(str(tmp_path / "db.tif"), 32, 32, str(tmp_path / "out"))
  assert done.value == "db" and done.chips == 2
  cpath, cdata = _scene(tmp_path / "slc.tif", geotiffs.UTM, np.complex64, (32, 32))
  assert tile.tile(cpath, 32, 32, str(tmp_path / "out"), max_nodata=0.9).value == "complex"
  stub = [json.loads(line) for name in ("db", "slc") for line in open(tmp_path / "out" / f"{name}.jsonl")]
  manifest = geotiffs.manifest(tmp_path / "out", [{**geotiffs.entry(i, ""), **line} for i, line in enumerate(stub)])
  source = ingest.ManifestSource(manifest)
  builder.build(tmp_path / "data", source)
  split = builder.open_split(tmp_path / "data", "train")
  stored = {r["id"]: r["image"] for r in (records.from_example(split[i]) for i in range(len(split)))}
  np.testing.assert_allclose(stored["db_r000000_c000000"], 10 ** (3 / 20), rtol=1e-6)
  np.testing.assert_allclose(stored["db_r000000_c000032"], 10 ** (-12 / 20), rtol=1e-6)
  slc = stored["slc_r000000_c000000"]
  assert np.isnan(slc[:20, :20]).all()
  np.testing.assert_allclose(slc[20:], np.abs(cdata[20:]), rtol=1e-6)


def test_multi_band_scenes_need_a_band_and_chips_keep_every_band(tmp_path):
  dual = np.stack([np.full((32, 32), 1000, np.uint16), np.full((32, 32), 200, np.uint16)])
  path = geotiffs.write(tmp_path / "dual.tif", dual)
  with pytest.raises(RecordError, match="has 2 bands; choose one with --band N"):
    tile.tile(path, 16, 16, str(tmp_path / "out"))
  done = tile.tile(path, 16, 16, str(tmp_path / "out"), band=2)
  line = json.loads(open(done.manifest).readline())
  assert line["band"] == 2 and done.chips == 4
  with rasterio.open(tmp_path / "out" / line["image"]) as chip:
    assert chip.count == 2


def test_the_cli_tiles_and_a_rerun_replaces_the_output(tmp_path, capsys):
  path, _ = _scene(tmp_path / "scene.tif", geotiffs.UTM)
  args = ["data", "tile", "--scene", path, "--chip", "32", "--out", str(tmp_path / "out"), "--max-nodata", "0.1"]
  assert cli.main(args) == 0
  # 80x72 px: windows at rows 0, 32 and cols 0, 32; the 20x20 nodata block is 39% of the first
  assert "3 chips of 32 px (amplitude), 1 windows over 10% nodata skipped" in capsys.readouterr().out
  assert cli.main(args[:-2] + ["--max-nodata", "1"]) == 0
  assert len(os.listdir(tmp_path / "out" / "scene")) == 4 == len(open(tmp_path / "out" / "scene.jsonl").readlines())
  assert sorted(os.listdir(tmp_path / "out")) == ["scene", "scene.jsonl"]  # no temporary left
  (tmp_path / "junk.tif").write_bytes(b"not a scene")
  junk = ["data", "tile", "--scene", str(tmp_path / "junk.tif"), "--chip", "32", "--out", str(tmp_path / "o")]
  assert cli.main(junk) == 2
  err = capsys.readouterr().err
  assert f"scene {tmp_path / 'junk.tif'} cannot be read" in err and err.count("\n") == 1
