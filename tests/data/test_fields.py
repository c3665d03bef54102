"""FUSAR-GEOVL-style field records as text: verbalisation in our clause format against
hand-written clauses, the keyword rule, field counts that do not match the scene type refused
(exit 2, the message naming file, line and fix), and field records ingested inline or joined
from a records JSONL by image_id."""

import json
import zlib

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from klip_jax import cli
from klip_jax.data import builder, fields, ingest, knowledge, records
from klip_jax.errors import RecordError

LANDFORM = {
    "Terrain": "The terrain in this SAR image is classified as a coastal plain, with flat low-lying land",
    "Functionality": "port logistics and fishing",
    "Distribution": "Farmland mainly in the lower right, with scattered villages",
    "Layout": "a patchwork of field parcels",
    "Boundary": "water and farmland",
    "Buildings": "Buildings are sparsely scattered along the coast",
    "Roads": "absent",
    "Water": "The water body type is a winding river that crosses the scene.",
}
# Written by hand from the templates (template 0 of every field) and the rules in fields.py.
LANDFORM_CLAUSES = [
    "The terrain in this SAR image is classified as a coastal plain, with flat low-lying land",  # a sentence
    "the main function of this region is port logistics and fishing",
    "the land cover distribution shows Farmland mainly in the lower right, with scattered villages",
    "the overall layout is a patchwork of field parcels",
    "the clearest boundary lies between water and farmland",
    "Buildings are sparsely scattered along the coast",  # "are" in words 2-4: a sentence
    "the road network is absent",
    "The water body type is a winding river that crosses the scene",  # final full stop dropped
]
LANDFORM_KEYWORDS = ["coastal plain", "port logistics and fishing", "Farmland mainly in the lower right",
                     "patchwork of field parcels", "water and farmland", "sparsely scattered", "absent",
                     "winding river"]
TARGET = {"count": "Three cargo ships are moored side by side", "location": "upper left and centre",
          "feature": "Strong point scattering with cross-shaped sidelobes oriented north-south",
          "size": "about 180", "category": "cargo ships",
          "distribution": "arranged in a row", "region": "Qingdao, China", "environment": "a coastal harbour"}
GEO = {"platform": "Sentinel-1", "band": "C", "polarization": "VV", "incidence_deg": 38.0, "looks": 1,
       "acquired": "2021-06-30", "city": "Qingdao", "country": "China"}


def _spans_by_hand(caption, keywords):
  """Each keyword's first occurrence at or after the start of its clause."""
  spans, start = [], 0
  for clause, keyword in zip(caption.split("$"), keywords):
    at = caption.index(keyword, start)
    spans.append((at, at + len(keyword)))
    start += len(clause) + 1
  return spans


def test_landform_record_verbalised_into_hand_written_clauses():
  record = fields.parse({"image_id": "s1_0007", **LANDFORM}, "m.jsonl:1")
  assert record.scene_type == "landform"  # from the field names
  caption, keywords, spans = fields.verbalise(record, [0] * 8)
  assert caption == "$".join(LANDFORM_CLAUSES)
  assert keywords == LANDFORM_KEYWORDS
  assert spans == _spans_by_hand(caption, LANDFORM_KEYWORDS)
  assert [caption[a:b] for a, b in spans] == LANDFORM_KEYWORDS
  starts = np.cumsum([0] + [len(c) + 1 for c in LANDFORM_CLAUSES[:-1]])
  for (a, b), start, clause in zip(spans, starts, LANDFORM_CLAUSES):  # each inside its own clause
    assert start <= a < b <= start + len(clause)


def test_target_record_numbers_and_templates():
  record = fields.parse({"image_id": "t1", "scene_type": "target", "fields": TARGET}, "m.jsonl:2")
  caption, keywords, _ = fields.verbalise(record, [1] * 8)
  assert caption.split("$") == [
      "Three cargo ships are moored side by side",
      "targets appear in the upper left and centre part",
      "bright elongated returns are oriented Strong point scattering with cross-shaped sidelobes oriented "
      "north-south",
      "the longest target measures roughly about 180 metres",
      "the target category is cargo ships",
      "the target arrangement is arranged in a row",
      "geographically the image is close to Qingdao, China",
      "the surrounding environment is a coastal harbour"]
  assert keywords == ["Three", "upper left and centre", "Strong point scattering", "180", "cargo ships",
                      "arranged in a row", "Qingdao", "coastal harbour"]


def test_template_choice_is_crc32_of_id_and_field():
  record = fields.parse({"image_id": "s1_0007", **LANDFORM}, "m.jsonl:1")
  expected = [zlib.crc32(f"s1_0007/{n}".encode()) % 3 for n in knowledge.LANDFORM_FIELDS]
  assert fields.template_choice("s1_0007", "landform") == expected
  assert fields.verbalise(record) == fields.verbalise(record, expected)


@pytest.mark.parametrize("value, keyword", [
    ("The terrain is classified as hilly area, with terraces", "hilly area"),  # after the cues, to the comma
    ("coastal plain with flat terrain", "coastal plain"),  # no cue: from the start to "with"
    ("Mainly cropland with scattered villages", "cropland"),  # leading hedge skipped
    ("The main function of this region is agricultural production and fishing activity today",
     "agricultural production and fishing activity today"),  # six words at most
    ("dense residential blocks of the", "dense residential blocks"),  # trailing function words dropped
    ("Targets are located in the upper left and centre of the image", "upper left and centre"),
    ("The scene lies near Qingdao, China", "Qingdao"),
    ("absent", "absent"),
])
def test_head_phrase_rule(value, keyword):
  a, b = fields.head_phrase(value)
  assert value[a:b] == keyword


@pytest.mark.parametrize("field, value, keyword", [
    ("count", "Three cargo ships", "Three"), ("count", "There are 12 ships", "12"),
    ("size", "approximately 180 metres long", "180"), ("size", "about 1,200 m", "1,200"),
    ("size", "very long", "very long"),  # no number: the head phrase
])
def test_numbers_are_the_keywords_of_count_and_size(field, value, keyword):
  a, b = fields.keyword_span("target", field, value)
  assert value[a:b] == keyword
  assert fields.number_value("Three cargo ships") == "3" and fields.number_value("about 1,200 m") == "1200"


def test_explicit_keywords_win_and_must_occur():
  entry = {"image_id": "x", **LANDFORM, "keywords": {"terrain": "Coastal Plain", "Layout": "field parcels"}}
  caption, keywords, spans = fields.verbalise(fields.parse(entry, "m.jsonl:1"), [0] * 8)
  assert keywords[0] == "coastal plain"  # found case-insensitively, written as the value has it
  assert keywords[3] == "field parcels" and keywords[1:3] == LANDFORM_KEYWORDS[1:3]
  assert [caption[a:b] for a, b in spans] == keywords
  as_list = {"image_id": "x", **LANDFORM, "keywords": [None, "", "", "patchwork", "", "", "", ""]}
  assert fields.verbalise(fields.parse(as_list, "w"), [0] * 8)[1][3] == "patchwork"
  with pytest.raises(RecordError, match=r"m.jsonl:4: keyword 'mountains' of Terrain does not occur in its value"):
    fields.parse({**entry, "keywords": {"Terrain": "mountains"}}, "m.jsonl:4")


@pytest.mark.parametrize("change, message", [
    (lambda e: e.pop("Water"), r"m.jsonl:9: 7 fields for a landform scene \(Water missing\); a landform record "
                               r"needs exactly these eight: Terrain, Functionality, Distribution, Layout, Boundary, "
                               r"Buildings, Roads, Water\."),
    (lambda e: e.update(Count="3"), r"m.jsonl:9: mixes landform fields .* with target fields \(Count\)"),
    (lambda e: e.update(scene_type="target"), r"8 fields for a target scene \(Count, .* missing; Terrain, "
                                              r".* not target fields\)"),
    (lambda e: e.update(Weather="sunny"), r"'Weather' is not an HCoT field"),
    (lambda e: e.update(Roads="a $ sign"), r"field Roads contains '\$', the clause separator"),
    (lambda e: e.update(Roads="  "), r"field Roads is empty"),
])
def test_field_records_that_do_not_match_the_scene_are_refused(change, message):
  entry = {"image_id": "x", **LANDFORM}
  change(entry)
  with pytest.raises(RecordError, match=message):
    fields.caption_entry(entry, "m.jsonl:9")


def test_captions_with_the_wrong_clause_count_are_refused():
  caption, _ = knowledge.verbalise("target", [str(i) for i in range(8)], [0] * 8)
  seven = caption.rsplit("$", 1)[0]
  with pytest.raises(RecordError, match=r"m.jsonl:3: the caption has 7 clauses for a target scene; give 8"):
    fields.caption_entry({"id": "a", "scene_type": "target", "caption": seven, "keywords": []}, "m.jsonl:3")
  with pytest.raises(RecordError, match="both a caption and field values"):
    fields.caption_entry({"id": "a", "caption": caption, **LANDFORM}, "m.jsonl:3")


# --- ingest ------------------------------------------------------------------------------------

def _write_geotiff(path, seed):
  data = np.random.default_rng(seed).integers(1, 5000, (32, 32)).astype(np.uint16)
  with rasterio.open(path, "w", driver="GTiff", height=32, width=32, count=1, dtype=data.dtype,
                     crs="EPSG:32651", transform=from_origin(500000.0, 3990000.0, 3.0, 3.0)) as dst:
    dst.write(data, 1)


@pytest.fixture
def folder(tmp_path):
  (tmp_path / "chips").mkdir()
  for i in range(3):
    _write_geotiff(tmp_path / "chips" / f"{i}.tif", i)
  return tmp_path


def _lines(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_field_records_ingested_inline_and_joined_by_image_id(folder, tmp_path):
  manifest = _lines(folder / "m.jsonl", [
      {"split": "train", "image_id": "a", "image": "chips/0.tif", "geo": GEO, **LANDFORM},  # inline
      {"split": "train", "id": "b", "image": "chips/1.tif", "geo": GEO},  # text from the records file
      {"split": "train", "id": "c", "image": "chips/2.tif", "geo": GEO}])
  text = _lines(folder / "r.jsonl", [{"image_id": "c", "scene_type": "target", **TARGET},
                                     {"image_id": "b", **{k.lower(): v for k, v in LANDFORM.items()}}])
  out = tmp_path / "data"
  builder.build(out, ingest.ManifestSource(manifest, records=text))
  source = builder.open_split(out, "train")
  got = {r["id"]: r for r in (records.from_example(source[i]) for i in range(len(source)))}
  for rid in "abc":
    records.validate_record(got[rid])
  assert got["a"]["scene_type"] == got["b"]["scene_type"] == "landform" and got["c"]["scene_type"] == "target"
  for rid in "ab":  # the caption is the clauses, templates chosen by the crc32 rule
    clauses = got[rid]["caption"].split("$")
    assert clauses[0] == LANDFORM_CLAUSES[0] and clauses[5] == LANDFORM_CLAUSES[5]
    assert list(got[rid]["keywords"]) == LANDFORM_KEYWORDS
  assert list(got["c"]["keywords"])[:4] == ["Three", "upper left and centre", "Strong point scattering", "180"]
  meta = builder.metadata(out)["settings"]
  assert meta["records"]["sha256"]  # a changed records file is another dataset


def _ingest(tmp_path, manifest, *extra):
  return cli.main(["data", "ingest", "--manifest", manifest, "--out", str(tmp_path / "data"), *extra])


def test_bad_field_records_exit_2_naming_file_and_line(folder, tmp_path, capsys):
  seven = {k: v for k, v in LANDFORM.items() if k != "Water"}
  manifest = _lines(folder / "m.jsonl", [
      {"split": "train", "id": "a", "image": "chips/0.tif", "geo": GEO, **LANDFORM},
      {"split": "train", "id": "b", "image": "chips/1.tif", "geo": GEO, **seven}])
  assert _ingest(tmp_path, manifest) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0  # one line
  assert err.startswith(f"klip: error: {manifest}:2: 7 fields for a landform scene (Water missing); a landform "
                        "record needs exactly these eight: Terrain, Functionality")
  assert not (tmp_path / "data").exists()  # nothing half-written

  # Joined from a records file: the records file's line is named.
  manifest = _lines(folder / "m2.jsonl", [{"split": "train", "id": "a", "image": "chips/0.tif", "geo": GEO}])
  text = _lines(folder / "r.jsonl", [{"image_id": "a", **seven}])
  assert _ingest(tmp_path, manifest, "--records", text) == 2
  assert f"{text}:1: 7 fields for a landform scene (Water missing)" in capsys.readouterr().err

  # A record for no chip, a chip with no text, a repeated image_id.
  text = _lines(folder / "r.jsonl", [{"image_id": "a", **LANDFORM}, {"image_id": "zz", **LANDFORM}])
  assert _ingest(tmp_path, manifest, "--records", text) == 2
  assert f"{text}:2: image_id 'zz' names no chip in {manifest}" in capsys.readouterr().err
  manifest = _lines(folder / "m3.jsonl", [{"split": "train", "id": "a", "image": "chips/0.tif", "geo": GEO},
                                          {"split": "train", "id": "b", "image": "chips/1.tif", "geo": GEO}])
  text = _lines(folder / "r.jsonl", [{"image_id": "a", **LANDFORM}])
  assert _ingest(tmp_path, manifest, "--records", text) == 2
  assert f"{manifest}:2: chip 'b' has no caption, no field values and no field record in {text}" in \
      capsys.readouterr().err
  text = _lines(folder / "r.jsonl", [{"image_id": "a", **LANDFORM}, {"image_id": "a", **LANDFORM}])
  assert _ingest(tmp_path, manifest, "--records", text) == 2
  assert f"{text}:2: image_id 'a' repeats {text}:1" in capsys.readouterr().err
  assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("field, value, keyword, span", [
    ("functionality", "airport terminals beside a fishing port", "port", (35, 39)),  # not inside "airport"
    ("functionality", "an airport and the Port", "port", (19, 23)),  # a whole word ignoring case beats "airport"
    ("functionality", "an airport", "port", (6, 10)),  # no whole word: inside a word, as before
    ("terrain", "12 ships near 2.5 km of quay, 2 tugs", "2", (30, 31)),  # not inside "12" or "2.5"
], ids=["word", "word ignoring case", "inside a word", "number"])
def test_explicit_keywords_are_found_as_whole_words(field, value, keyword, span):
  assert fields.keyword_span("landform", field, value, keyword) == span
  entry = {"image_id": "x", **LANDFORM, field.capitalize(): value, "keywords": {field: keyword}}
  caption, keywords, spans = fields.verbalise(fields.parse(entry, "m.jsonl:1"), [0] * 8)
  index = knowledge.FIELDS["landform"].index(field)
  assert keywords[index] == value[span[0]:span[1]] and caption[slice(*spans[index])] == keywords[index]


def test_an_explicit_keyword_that_occurs_twice_as_a_word_is_refused():
  entry = {"image_id": "x", **LANDFORM, "Functionality": "a ferry port and a container port",
           "keywords": {"Functionality": "port"}}
  with pytest.raises(RecordError, match=r"m.jsonl:2: keyword 'port' of Functionality occurs 2 times as a word in "
                                        r"its value 'a ferry port and a container port'.*give a longer keyword"):
    fields.parse(entry, "m.jsonl:2")
  entry["keywords"] = {"Functionality": "container port"}  # a longer keyword says which one
  assert fields.verbalise(fields.parse(entry, "m.jsonl:2"), [0] * 8)[1][1] == "container port"
