"""HCoT prompts for chips without text (the content of each level from the chip's geo and
sensor), and an LLM's answers parsed into field records: good ones accepted, malformed ones
rejected with their reasons, and the records ingested."""

import json
import math

import numpy as np
import pyproj
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from klip_jax import cli
from klip_jax.data import builder, hcot, ingest, knowledge, records

GEO_A = {"platform": "Gaofen-3", "band": "C", "polarization": "HH", "incidence_deg": 35.2, "looks": 1,
         "acquired": "2021-06-30", "city": "Qingdao", "country": "China"}
GEO_B = {"platform": "UAVSAR", "band": "L", "polarization": "HV", "incidence_deg": 40.0, "looks": 3,
         "acquired": "2020-05-01", "city": "Houston", "country": "United States"}
TARGET = {"Count": "3 cargo ships", "Location": "upper left and centre", "Feature": "bright hulls oriented north-south",
          "Size": "about 180 metres", "Category": "cargo ships", "Distribution": "arranged in a row",
          "Region": "Qingdao, China", "Environment": "a coastal harbour"}
LANDFORM = {"Terrain": "coastal plain", "Functionality": "port logistics", "Distribution": "water mainly in the centre",
            "Layout": "a regular street grid", "Boundary": "water and buildings", "Buildings": "densely built",
            "Roads": "dense and grid-like", "Water": "open sea"}


def _tif(path, crs, transform):
  data = np.random.default_rng(0).integers(1, 5000, (32, 32)).astype(np.uint16)
  with rasterio.open(path, "w", driver="GTiff", height=32, width=32, count=1, dtype=data.dtype, crs=crs,
                     transform=transform) as dst:
    dst.write(data, 1)


def _lines(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


@pytest.fixture
def folder(tmp_path):
  (tmp_path / "chips").mkdir()
  _tif(tmp_path / "chips" / "a.tif", "EPSG:32651", from_origin(500000.0, 3990000.0, 3.0, 3.0))  # UTM, 3 m
  _tif(tmp_path / "chips" / "b.tif", "EPSG:4326", from_origin(-95.37, 29.76, 1e-4, 1e-4))  # degrees
  Image.fromarray(np.ones((32, 32), np.uint16)).save(tmp_path / "chips" / "p.png")
  return tmp_path


def _manifest(folder):
  caption, _ = knowledge.verbalise("target", ["1"] * 8, [0] * 8)
  return _lines(folder / "m.jsonl", [
      {"split": "train", "id": "a", "image": "chips/a.tif", "scene_type": "target", "geo": GEO_A},
      {"split": "train", "id": "b", "image": "chips/b.tif", "geo": GEO_B},  # the LLM decides the scene type
      {"split": "train", "id": "c", "image": "chips/a.tif", "scene_type": "target", "caption": caption,
       "keywords": ["1"] * 8, "geo": GEO_A},  # has text: no prompt
      {"split": "train", "id": "d", "image": "chips/a.tif", "geo": GEO_A, **LANDFORM}])  # has text


def test_prompts_per_level_from_geo_and_sensor(folder, capsys):
  out = folder / "prompts.jsonl"
  assert cli.main(["data", "hcot-prompts", "--manifest", _manifest(folder), "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "2 HCoT prompts (5 levels each)" in printed and "2 chips already have text" in printed
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [p["image_id"] for p in lines] == ["a", "b"]
  a, b = lines
  assert [level["name"] for level in a["levels"]] == [
      "geoscience", "social development and regional function", "SAR scattering", "instance identification",
      "consistency check"]
  level = {lv["level"]: lv["prompt"] for lv in a["levels"]}
  lon, lat = pyproj.Transformer.from_crs(32651, 4326, always_xy=True).transform(500000 + 48, 3990000 - 48)
  assert f"longitude {lon:.4f}, latitude {lat:.4f} (WGS84), in or near Qingdao, China" in level[1]
  assert "regional function" in level[2] and "urban core" in level[2]
  assert "C-band (wavelength about 5.6 cm" in level[3] and "HH polarisation (co-polarised HH" in level[3]
  assert "by Gaofen-3, at 35.2 degrees incidence, with 1 look, on 2021-06-30" in level[3]
  assert "32 x 32 pixels at 3 m per pixel, about 96 m x 96 m on the ground" in level[4]
  assert f"cargo ship (145 m) about {round(145 / 3)} pixels" in level[4]  # (90 + 200) / 2 m at 3 m
  assert "ships lie on water" in level[5]
  # The answer asks for the eight target fields (scene type given) as JSON with keywords.
  skeleton = json.loads(a["answer_format"].split("like: ", 1)[1])
  assert [k for k in skeleton if k not in ("image_id", "scene_type", "keywords")] == list(TARGET)
  assert skeleton["image_id"] == "a" and a["fields"] == list(TARGET) and "Terrain" not in a["prompt"]
  assert a["prompt"].index("Level 1") < a["prompt"].index("Level 5") < a["prompt"].index("one JSON object")
  # Chip b: no scene type given -> both field sets; L-band cross-pol physics.
  assert "First decide the scene type" in b["answer_format"] and "Terrain" in b["answer_format"]
  assert "L-band (wavelength about 23.5 cm" in b["prompt"] and "cross-polarised" in b["prompt"]
  # Chips with a field record already (e.g. from an earlier hcot-parse) are not prompted again.
  have = _lines(folder / "r.jsonl", [{"image_id": "a", "scene_type": "target", **TARGET}])
  assert hcot.write_prompts(_manifest(folder), str(out), have) == {"prompts": 1, "with_text": 3}


def test_geographic_crs_resolution_is_the_geodesic_pixel_size(folder):
  chip = hcot.chip_of({"id": "b", "image": "chips/b.tif"}, str(folder), "m.jsonl:2")
  phi = math.radians(chip.lat)
  # Degree lengths on the WGS84 ellipsoid (series formulas, independent of pyproj).
  lon_m = 111412.84 * math.cos(phi) - 93.5 * math.cos(3 * phi)
  lat_m = 111132.92 - 559.82 * math.cos(2 * phi) + 1.175 * math.cos(4 * phi)
  # The pixel's ground size as ingest stores it: the geometric mean of its two sides.
  assert chip.resolution_m == pytest.approx(math.sqrt(lon_m * lat_m) * 1e-4, rel=1e-3)
  assert chip.lon == pytest.approx(-95.37 + 16e-4) and chip.lat == pytest.approx(29.76 - 16e-4)


def test_prompts_refuse_a_chip_without_location(folder, capsys):
  manifest = _lines(folder / "m.jsonl", [{"id": "p", "image": "chips/p.png", "geo": {"resolution_m": 3.0}}])
  assert cli.main(["data", "hcot-prompts", "--manifest", manifest, "--out", str(folder / "p.jsonl")]) == 2
  assert capsys.readouterr().err.strip() == (
      f"klip: error: {manifest}:1: the prompts need the chip's location (geoscience level); give a GeoTIFF "
      "with a CRS, or geo.lon and geo.lat.")
  assert not (folder / "p.jsonl").exists()


def _reply(obj, prose=True):
  text = json.dumps(obj)
  return f"Level 1: the chip lies near the coast...\n```json\n{text}\n```\nDone." if prose else text


def test_parse_accepts_good_answers_and_rejects_malformed_ones(folder, capsys):
  seven = {k: v for k, v in LANDFORM.items() if k != "Water"}
  answers = _lines(folder / "answers.jsonl", [
      {"image_id": "a", "answer": _reply({"image_id": "a", "scene_type": "target", **TARGET,
                                          "keywords": {"Category": "cargo ships", "Feature": "big hulls"}})},
      {"image_id": "b", **LANDFORM},  # the object itself
      "this line is not JSON",
      {"image_id": "c", "answer": "I cannot see the image."},
      {"image_id": "d", "response": _reply(seven)},
      {"image_id": "a", "answer": _reply({**TARGET})},
      {"image_id": "e", "answer": _reply({"image_id": "f", **TARGET})},
      {"answer": _reply(TARGET, prose=False)},
      {"image_id": "g", "answer": _reply({**LANDFORM, "Roads": "roads cost $5"})},
  ])
  out = folder / "records.jsonl"
  assert cli.main(["data", "hcot-parse", answers, "--out", str(out)]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert printed[:-1] == [
      f"{answers}:3: rejected: the line is not JSON (Expecting value, column 1)",
      f"{answers}:4 (c): rejected: the reply holds no JSON object (it begins 'I cannot see the image.')",
      f"{answers}:5 (d): rejected: 7 fields for a landform scene (Water missing); a landform record needs exactly "
      "these eight: Terrain, Functionality, Distribution, Layout, Boundary, Buildings, Roads, Water.",
      f"{answers}:6 (a): rejected: image_id repeats {answers}:1",
      f"{answers}:7 (e): rejected: the reply's image_id 'f' differs from the line's 'e'",
      f"{answers}:8: rejected: no image_id on the line or in the reply",
      f"{answers}:9 (g): rejected: field Roads contains '$', the clause separator; remove it from the value."]
  assert printed[-1] == (
      f"2 of 9 answers -> field records in {out}; rejected 7: 1 not JSON, 1 no JSON object, 1 field count, "
      "1 duplicate image_id, 1 image_id mismatch, 1 no image_id, 1 separator in value; 1 keywords not found in "
      "their values dropped (the head-phrase rule picks them)")
  got = [json.loads(line) for line in out.read_text().splitlines()]
  assert got == [{"image_id": "a", "scene_type": "target", **TARGET, "keywords": {"Category": "cargo ships"}},
                 {"image_id": "b", "scene_type": "landform", **LANDFORM}]

  # The records are what `klip data ingest --records` takes.
  manifest = _lines(folder / "m.jsonl", [{"split": "train", "id": "a", "image": "chips/a.tif", "geo": GEO_A},
                                         {"split": "train", "id": "b", "image": "chips/a.tif", "geo": GEO_A}])
  builder.build(folder / "data", ingest.ManifestSource(manifest, records=str(out)))
  source = builder.open_split(folder / "data", "train")
  ingested = {r["id"]: r for r in (records.from_example(source[i]) for i in range(2))}
  assert ingested["a"]["keywords"][:5] == ["3", "upper left and centre", "north-south", "180", "cargo ships"]
  assert ingested["b"]["keywords"][0] == "coastal plain"


def test_parse_with_no_usable_answer_exits_2_and_writes_nothing(folder, capsys):
  answers = _lines(folder / "answers.jsonl", ["not json", {"image_id": "x", "answer": "no idea"}])
  assert cli.main(["data", "hcot-parse", answers, "--out", str(folder / "r.jsonl")]) == 2
  captured = capsys.readouterr()
  assert f"{answers}:2 (x): rejected: the reply holds no JSON object" in captured.out
  assert captured.err.strip() == (f"klip: error: no usable answer in {answers} (1 not JSON, 1 no JSON object); "
                                  "see the reasons above, fix the answers or re-ask the LLM.")
  assert not (folder / "r.jsonl").exists()


def test_json_object_finds_the_first_object_in_prose():
  assert hcot.json_object('Sure! {"a": 1} and {"b": 2}') == {"a": 1}
  assert hcot.json_object("a { brace then ```json\n{\"x\": [1, {\"y\": 2}]}\n```") == {"x": [1, {"y": 2}]}
  assert hcot.json_object("[1, 2] no object") is None
