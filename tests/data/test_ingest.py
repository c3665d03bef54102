"""Real data in: GeoTIFF/PNG chips listed in a JSONL manifest become a validated dataset."""

import json
import math

import numpy as np
import pyproj
import pytest
import rasterio
from rasterio.transform import from_origin

from klip_jax.data import builder, ingest, knowledge, pipeline, records
from klip_jax.data.tokenizer import TextCodec
from klip_jax.errors import RecordError
from tests.data import geotiffs

KEYWORDS = ["2", "upper left and centre", "north-south", "150", "cargo ships", "scattered across the scene",
            "qingdao, china", "a coastal harbour"]
GEO = {"platform": "Gaofen-3", "band": "C", "polarization": "HH", "incidence_deg": 35.2, "looks": 1,
       "acquired": "2021-06-30", "city": "Qingdao", "country": "China"}


def _write_geotiff(path, data, easting=500000.0, northing=3990000.0, res=3.0):
  with rasterio.open(path, "w", driver="GTiff", height=data.shape[0], width=data.shape[1], count=1,
                     dtype=data.dtype, crs="EPSG:32651", transform=from_origin(easting, northing, res, res)) as dst:
    dst.write(data, 1)


def _manifest(tmp_path, entries):
  path = tmp_path / "manifest.jsonl"
  path.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
  return str(path)


def _entry(i, split, image):
  caption, _ = knowledge.verbalise("target", KEYWORDS, [i % 3] * 8)
  return {"split": split, "id": f"chip{i}", "image": image, "scene_type": "target", "caption": caption,
          "keywords": KEYWORDS, "geo": GEO,
          "truth": {"boxes": [[2, 3, 10, 6], [20, 20, 30, 24]], "box_classes": ["cargo ship", "cargo ship"]}}


@pytest.fixture
def chips(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / "chips").mkdir()
  entries = []
  for i in range(4):
    _write_geotiff(tmp_path / "chips" / f"{i}.tif", rng.integers(1, 5000, (32, 32)).astype(np.uint16))
    entries.append(_entry(i, "train" if i < 3 else "val", f"chips/{i}.tif"))
  return tmp_path, entries


def test_geotiff_manifest_becomes_a_dataset_with_geo_from_the_file(chips, tmp_path):
  folder, entries = chips
  out = tmp_path / "data"
  builder.build(out, ingest.ManifestSource(_manifest(folder, entries)))
  source = builder.open_split(out, "train")
  assert len(source) == 3 and len(builder.open_split(out, "val")) == 1
  record = records.from_example(source[0])
  records.validate_record(record)
  geo = record["geo"]
  assert geo["epsg"] == 32651 and geo["resolution_m"] == 3.0
  assert geo["geotransform"].tolist() == [500000.0, 3.0, 0.0, 3990000.0, 0.0, -3.0]
  lon, lat = pyproj.Transformer.from_crs(32651, 4326, always_xy=True).transform(500000 + 48, 3990000 - 48)
  assert abs(geo["lon"] - lon) < 1e-9 and abs(geo["lat"] - lat) < 1e-9
  assert record["truth"]["counts"][1] == 2 and record["truth"]["dominant"] == records.UNKNOWN_CLASS
  assert record["truth"]["grid"][0, 0] == 1 and record["truth"]["grid"][2, 2] == 1
  with rasterio.open(folder / "chips" / "0.tif") as src:
    originals = {src.read(1).tobytes()}
  assert any(records.from_example(source[i])["image"].tobytes() in originals for i in range(3))


def test_ingested_dataset_feeds_the_pipeline(chips, tmp_path, tiny_tokenizer):
  folder, entries = chips
  out = tmp_path / "data"
  builder.build(out, ingest.ManifestSource(_manifest(folder, entries)))
  batch = next(iter(pipeline.build(pipeline.PipelineOptions(str(out), "train", 3, train=False),
                                   TextCodec(tiny_tokenizer, 96))))
  assert batch["image"].shape == (3, 32, 32, 1) and np.isfinite(batch["image"]).all()


def test_bad_manifest_lines_are_named_and_nothing_is_written(chips, tmp_path):
  folder, entries = chips
  bad = dict(entries[1], keywords=["7"] + KEYWORDS[1:])
  with pytest.raises(RecordError, match=r"manifest.jsonl:2: keyword 0 '7' does not occur"):
    builder.build(tmp_path / "data", ingest.ManifestSource(_manifest(folder, [entries[0], bad])))
  assert not (tmp_path / "data").exists()
  png_without_geo = dict(entries[0], image="chips/x.png")
  from PIL import Image
  Image.fromarray(np.ones((32, 32), np.uint16)).save(folder / "chips" / "x.png")
  with pytest.raises(RecordError, match="geo.lon"):
    ingest.ManifestSource(_manifest(folder, [png_without_geo])).validate()


# ---------------------------------------------------------------------------------------------
# Calibrated rasters: value types, nodata, CRSs.


def _db_reference(amplitudes):
  """Independent reference: dB over valid pixels in float64, zeros at the -100 dB floor."""
  db = np.concatenate([20 * np.log10(np.maximum(a[np.isfinite(a)].astype(np.float64), 1e-5)) for a in amplitudes])
  return db.mean(), db.std()


def test_calibrated_float_amplitude_keeps_its_dynamic_range(tmp_path, tiny_tokenizer):
  """Airborne calibrated amplitude in 0-8: every distinct value survives ingest, and the input
  the model sees is numpy's standardised dB of the float values (not of rounded integers)."""
  rng = np.random.default_rng(1)
  (tmp_path / "chips").mkdir()
  amplitudes, entries = [], []
  for i in range(3):
    a = np.clip(rng.gamma(2.0, 0.8, (32, 32)), 0.0, 8.0).astype(np.float32)
    amplitudes.append(a)
    geotiffs.write(tmp_path / "chips" / f"{i}.tif", a, geotiffs.UTM if i else geotiffs.WGS84)
    entries.append(geotiffs.entry(i, f"chips/{i}.tif"))
  out = tmp_path / "data"
  builder.build(out, ingest.ManifestSource(geotiffs.manifest(tmp_path, entries)))
  source = builder.open_split(out, "train")
  stored = {r["id"]: r for r in (records.from_example(source[i]) for i in range(3))}
  for i, a in enumerate(amplitudes):
    image = stored[f"chip{i}"]["image"]
    assert image.dtype == np.float32 and np.array_equal(image, a)
    assert len(np.unique(image)) == len(np.unique(a)) > 1000  # np.rint would leave 9 values
  assert len(np.unique(np.rint(amplitudes[0]))) <= 9
  mean, std = _db_reference(amplitudes)
  meta = builder.metadata(out)
  assert meta["db_mean"] == pytest.approx(mean, rel=1e-6) and meta["db_std"] == pytest.approx(std, rel=1e-6)
  assert meta["image_shape"] == [32, 32]
  batch = next(iter(pipeline.build(pipeline.PipelineOptions(str(out), "train", 3, train=False),
                                   TextCodec(tiny_tokenizer, 96))))
  order = [int(i) for i in batch["index"]]
  for row, index in enumerate(order):
    a = amplitudes[int(records.from_example(source[index])["id"][4:])]
    reference = (20 * np.log10(np.maximum(a.astype(np.float64), 1e-5)) - meta["db_mean"]) / meta["db_std"]
    np.testing.assert_allclose(batch["image"][row, ..., 0], reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("crs", ["utm", "wgs84"])
def test_every_value_type_and_nodata_ingest_as_amplitude(tmp_path, crs):
  """uint16 DN, float32 amplitude, float32 dB (detected and declared), sigma0 intensity and
  complex64 SLC, some with GeoTIFF nodata: the stored amplitude is numpy's conversion, nodata
  is NaN and counts in no statistic."""
  crs_transform = geotiffs.UTM if crs == "utm" else geotiffs.WGS84
  rng = np.random.default_rng(2)
  amplitude = rng.uniform(0.05, 6.0, (32, 32))
  hole = np.zeros((32, 32), bool)
  hole[:5, :7] = True
  phase = np.exp(1j * rng.uniform(0, 2 * np.pi, (32, 32)))
  holed = np.where(hole, np.nan, amplitude)
  cases = [  # (file samples, nodata, declared value, expected amplitude with NaN holes)
      ((amplitude * 1000).astype(np.uint16), None, None, (amplitude * 1000).astype(np.uint16)),
      (np.where(hole, -9999, amplitude).astype(np.float32), -9999, None, holed),
      (np.where(hole, np.nan, 20 * np.log10(amplitude)).astype(np.float32), None, None, holed),
      ((20 * np.log10(amplitude) + 30).astype(np.float32), None, "db", amplitude * 10 ** 1.5),
      (np.where(hole, 0, amplitude**2).astype(np.float32), 0, "intensity", holed),
      ((amplitude * phase).astype(np.complex64), None, None, amplitude),
  ]
  (tmp_path / "chips").mkdir()
  entries = []
  for i, (data, nodata, value, _) in enumerate(cases):
    geotiffs.write(tmp_path / "chips" / f"{i}.tif", data, crs_transform, nodata=nodata)
    entries.append(geotiffs.entry(i, f"chips/{i}.tif", **({"value": value} if value else {})))
  out = tmp_path / "data"
  builder.build(out, ingest.ManifestSource(geotiffs.manifest(tmp_path, entries)))
  source = builder.open_split(out, "train")
  stored = {r["id"]: r for r in (records.from_example(source[i]) for i in range(len(cases)))}
  for i, (*_, expected) in enumerate(cases):
    image = stored[f"chip{i}"]["image"]
    assert image.dtype == expected.dtype if expected.dtype == np.uint16 else image.dtype == np.float32
    np.testing.assert_allclose(image, expected, rtol=2e-5, err_msg=f"case {i}")
    assert stored[f"chip{i}"]["geo"]["epsg"] == (32651 if crs == "utm" else 4326)
  # Statistics: uint16 chips count every pixel from 1 DN; float chips their valid pixels only.
  db = [20 * np.log10(np.maximum(c[-1].astype(np.float64), 1.0)).ravel() for c in cases[:1]]
  db += [20 * np.log10(np.maximum(c[-1][np.isfinite(c[-1])].astype(np.float64), 1e-5)) for c in cases[1:]]
  db = np.concatenate(db)
  meta = builder.metadata(out)
  assert meta["db_mean"] == pytest.approx(db.mean(), rel=1e-5) and meta["db_std"] == pytest.approx(db.std(), rel=1e-5)


def test_a_two_band_file_is_refused_unless_a_band_is_chosen(tmp_path):
  (tmp_path / "chips").mkdir()
  vv, vh = np.full((32, 32), 900, np.uint16), np.full((32, 32), 300, np.uint16)
  geotiffs.write(tmp_path / "chips" / "dual.tif", np.stack([vv, vh]))
  with pytest.raises(RecordError, match=r"manifest.jsonl:1: image chips/dual.tif has 2 bands.*\"band\": N"):
    ingest.ManifestSource(geotiffs.manifest(tmp_path, [geotiffs.entry(0, "chips/dual.tif")])).validate()
  source = ingest.ManifestSource(geotiffs.manifest(tmp_path, [geotiffs.entry(0, "chips/dual.tif", band=2)]))
  source.validate()
  assert np.array_equal(source.record("train", 0)["image"], vh)


def test_descriptive_geo_fields_are_optional_with_stated_defaults(tmp_path):
  (tmp_path / "chips").mkdir()
  geotiffs.write(tmp_path / "chips" / "a.tif", np.full((32, 32), 5, np.uint16), geotiffs.WGS84)
  line = geotiffs.entry(0, "chips/a.tif")
  del line["geo"]
  source = ingest.ManifestSource(geotiffs.manifest(tmp_path, [line]))
  source.validate()
  geo = source.record("train", 0)["geo"]
  assert {k: geo[k] for k in ("city", "country", "acquired", "platform", "band", "polarization", "looks")} == {
      "city": "unknown", "country": "unknown", "acquired": "unknown", "platform": "unknown", "band": "unknown",
      "polarization": "unknown", "looks": 1}
  assert math.isnan(geo["incidence_deg"]) and geo["epsg"] == 4326


def test_keyword_spans_are_found_as_whole_words():
  """"port" is not found inside "airport", nor "2" inside "12" (spans computed by hand)."""
  caption = "an airport beside a port$12 ships and 2 tugs$an airport"
  assert ingest._spans(caption, ["port", "2", "port"], "m:1") == [(20, 24), (38, 39), (51, 55)]
  with pytest.raises(RecordError, match=r"m:4: keyword 0 'port' occurs 2 times as a word in clause 0 "
                                        r"'a port and a port'; give 'spans'"):
    ingest._spans("a port and a port$x", ["port", "x"], "m:4")
