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


@pytest.mark.parametrize("box, problem", [
    ([0.1, 0.1, 0.2, 0.3], r"row 0 = \(0\.1, 0\.1, 0\.2, 0\.3\) has every value in \[0, 1\], which looks "
                           r"normalised.*pixel coordinates"),
    ([-20, -20, -5, -5], r"row 0 = \(-20, -20, -5, -5\) is not a box inside the 48x48 image.*"
                         r"pixel coordinates \(x0, y0, x1, y1\) with 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48"),
    ([500, 500, 600, 600], r"row 0 = \(500, 500, 600, 600\) is not a box inside the 48x48 image"),
    ([30, 30, 10, 10], r"row 0 = \(30, 30, 10, 10\) is not a box inside"),
    ([10, 5, 12, 5], r"row 0 = \(10, 5, 12, 5\) is not a box inside"),  # empty: y0 == y1
    ([40, 2, 48.5, 9], r"row 0 = \(40, 2, 48\.5, 9\) is not a box inside"),  # 0.5 px past the edge
], ids=["normalised", "negative", "outside", "inverted", "empty", "past the edge"])
def test_boxes_must_be_pixel_boxes_inside_the_image(record, box, problem):
  """truth_from_targets clamps the 3x3 grid, so these boxes would have given wrong truth."""
  assert record["image"].shape == (48, 48)
  bad = copy.deepcopy(record)
  boxes = [[2, 3, 10, 6], box]  # the first box is fine: the second is named as row 1
  bad["truth"] = records.truth_from_targets((48, 48), boxes, [0, 0], record["truth"]["landcover"])
  expected = f"record {record['id']!r}: field 'truth.boxes' " + problem.replace("row 0", "row 1")
  with pytest.raises(RecordError, match=expected):
    records.validate_record(bad)


def test_pixel_boxes_up_to_the_image_edge_are_valid(record):
  good = copy.deepcopy(record)
  good["truth"] = records.truth_from_targets((48, 48), [[0, 0, 48, 48], [40.5, 1, 48, 2.5]], [0, 1])
  records.validate_record(good)
  # Centres (24, 24) and (44.25, 1.75): grid cells (1, 1) and (0, 2).
  assert good["truth"]["grid"].tolist() == [[0, 0, 1], [0, 1, 0], [0, 0, 0]]


def test_landcover_values_that_are_no_class_are_refused(record):
  bad = copy.deepcopy(record)
  mask = np.ones((48, 48), np.uint8)
  mask[:4] = 7
  mask[4:6] = 200
  mask[6:8] = records.UNKNOWN_LANDCOVER
  bad["truth"] = records.truth_from_targets((48, 48), [], [], mask)
  with pytest.raises(RecordError, match=r"field 'truth.landcover' holds values \[7, 200\] \(all values found: "
                                        r"\[1, 7, 200, 255\]\).*0 water, 1 vegetation, 2 bare, 3 urban, 4 road, "
                                        r"5 runway, or 255 for unknown pixels"):
    records.validate_record(bad)


def test_landcover_dominant_counts_known_pixels_only(record):
  mask = np.full((48, 48), records.UNKNOWN_LANDCOVER, np.uint8)
  assert records.truth_from_targets((48, 48), [], [], mask)["dominant"] == records.UNKNOWN_CLASS
  mask[:10] = 3  # 480 urban pixels, 1824 unknown
  mask[10:12] = 0  # 96 water pixels
  good = copy.deepcopy(record)
  good["truth"] = records.truth_from_targets((48, 48), [], [], mask)
  records.validate_record(good)
  assert good["truth"]["dominant"] == 3


@pytest.mark.parametrize("field, value", [("looks", 2.7), ("epsg", 4326.9)])
def test_integer_geo_fields_must_be_whole_numbers(record, field, value):
  bad = copy.deepcopy(record)
  bad["geo"][field] = value
  with pytest.raises(RecordError, match=f"field 'geo.{field}' is {value}; it must be a whole number .*truncated "
                                        f"to {int(value)}"):
    records.validate_record(bad)
  bad["geo"][field] = float(int(value))  # 2.0 is the whole number 2
  records.validate_record(bad)
