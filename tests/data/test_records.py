"""Record validation: every documented problem raises RecordError naming the field."""

import copy

import numpy as np
import pytest

from klip_jax.data import builder, records
from klip_jax.errors import RecordError
from tests.conftest import TINY_SETTINGS


@pytest.fixture
def record():
  return builder.synth_record(TINY_SETTINGS, "train", 4)


def test_synthetic_records_are_valid(record):
  records.validate_record(record)


def test_png_round_trip_is_lossless(record):
  assert np.array_equal(records.decode_png(records.encode_png(record["image"])), record["image"])


def _set(record, path, value):
  *parents, last = path.split(".")
  target = record
  for key in parents:
    target = target[key]
  if value is _DELETE:
    del target[last]
  else:
    target[last] = value


_DELETE = object()

CASES = [
    ("image", lambda r: r["image"].astype(np.float64), "image", "uint16"),
    ("float image with inf", lambda r: np.full(r["image"].shape, np.inf, np.float32), "image", "inf"),
    ("float image all nan", lambda r: np.full(r["image"].shape, np.nan, np.float32), "image", "no valid pixel"),
    ("negative float image", lambda r: -r["image"].astype(np.float32), "image", "negative"),
    ("image shape", lambda r: r["image"][None], "image", "2 dims"),
    ("missing city", lambda r: _DELETE, "geo.city", "missing"),
    ("nan geotransform", lambda r: np.array([0, np.nan, 0, 0, 0, -1.0]), "geo.geotransform", "NaN"),
    ("inf lon", lambda r: float("inf"), "geo.lon", "finite"),
    ("lon out of range", lambda r: 181.0, "geo.lon", "outside"),
    ("lat out of range", lambda r: -91.0, "geo.lat", "outside"),
    ("empty caption", lambda r: "  ", "caption", "empty"),
    ("bad date", lambda r: "30/06/2021", "geo.acquired", "ISO date"),
    ("bad scene type", lambda r: "city", "scene_type", "one of"),
    ("nan box", lambda r: np.full((1, 4), np.nan, np.float32), "truth.boxes", "NaN"),
    ("wrong landcover shape", lambda r: np.zeros((3, 3), np.uint8), "truth.landcover", "shape"),
]


@pytest.mark.parametrize("name,value,field,problem", CASES, ids=[c[0] for c in CASES])
def test_bad_field_raises_naming_field_and_problem(record, name, value, field, problem):
  bad = copy.deepcopy(record)
  path = field
  _set(bad, path, value(bad))
  if name == "nan box":
    bad["truth"]["box_classes"] = np.zeros(1, np.int32)
  with pytest.raises(RecordError, match=f"'{field}'.*{problem}"):
    records.validate_record(bad)


def test_float_amplitude_with_nodata_and_unknown_geo_is_valid(record):
  """Calibrated float32 amplitude with NaN holes, incidence and date unknown (ingest's defaults)."""
  good = copy.deepcopy(record)
  good["image"] = good["image"].astype(np.float32) / 1000
  good["image"][:3, :5] = np.nan
  good["geo"].update(incidence_deg=float("nan"), acquired="unknown", epsg=0)
  records.validate_record(good)
  stored = records.from_example(records.to_example(good))
  assert stored["image"].dtype == np.float32 and np.array_equal(stored["image"], good["image"], equal_nan=True)


def test_span_outside_the_caption_is_rejected(record):
  bad = copy.deepcopy(record)
  bad["spans"][-1] = [len(bad["caption"]) - 2, len(bad["caption"]) + 5]
  with pytest.raises(RecordError, match="'spans'.*outside clause 7"):
    records.validate_record(bad)


def test_span_that_misses_its_keyword_is_rejected(record):
  bad = copy.deepcopy(record)
  bad["spans"][0] = bad["spans"][0] - 1
  with pytest.raises(RecordError, match="'spans'.*row 0 covers"):
    records.validate_record(bad)


def test_missing_top_level_field_is_named(record):
  bad = copy.deepcopy(record)
  del bad["caption"]
  with pytest.raises(RecordError, match="'caption' is missing"):
    records.validate_record(bad)


def test_tfds_example_round_trip(record):
  back = records.from_example(records.to_example(record))
  assert np.array_equal(back["image"], record["image"])
  assert np.array_equal(back["truth"]["landcover"], record["truth"]["landcover"])
  assert back["caption"] == record["caption"]
