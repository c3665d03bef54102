"""Real data in: GeoTIFF/PNG chips listed in a JSONL manifest become a validated dataset."""

import json

import numpy as np
import pyproj
import pytest
import rasterio
from rasterio.transform import from_origin

from klip_jax.data import builder, ingest, knowledge, pipeline, records
from klip_jax.data.tokenizer import TextCodec
from klip_jax.errors import RecordError

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
  _write_geotiff(folder / "chips" / "float.tif", np.ones((32, 32), np.float32))
  with pytest.raises(RecordError, match="float32; convert it to uint16"):
    ingest.ManifestSource(_manifest(folder, [dict(entries[0], image="chips/float.tif")])).validate()
  png_without_geo = dict(entries[0], image="chips/x.png")
  from PIL import Image
  Image.fromarray(np.ones((32, 32), np.uint16)).save(folder / "chips" / "x.png")
  with pytest.raises(RecordError, match="geo.lon"):
    ingest.ManifestSource(_manifest(folder, [png_without_geo])).validate()
