"""The record schema of one SAR chip, its validation, and its encoding for ArrayRecord.

A record is a plain dict (numpy arrays, str, float, int) with the keys below. Synthetic chips
and real data use the same schema; `validate_record` rejects a bad record with an error that
names the field and the problem, before anything is written. Images are stored lossless:
uint16 as PNG, float32 as .npy bytes (read back with allow_pickle=False); other arrays as tensors.

    id            str, unique within the dataset (caption overlays are keyed by it)
    image         single-channel amplitude [H, W]: uint16 digital numbers (the synthetic world,
                  integer chips without nodata) or float32 (calibrated data, any value type
                  converted by raster.py), NaN where the source had no data
    geo           lon, lat (WGS84 chip centre), epsg (0: a CRS without an EPSG code),
                  geotransform (6 floats), city, country, platform, band, polarization,
                  resolution_m, incidence_deg (NaN: unknown), looks, acquired (ISO date, or
                  "unknown"); epsg and looks are whole numbers
    scene_type    "landform" or "target"
    field_names   the eight HCoT field names of that scene type, in clause order
    keywords      the eight keywords as written in the caption (possibly wrong)
    caption       the clauses joined by "$"
    spans         int32 [8, 2] character span of each clause's keyword in the caption
    truth         landcover uint8 [H, W] (terrain.LANDCOVER class ids, UNKNOWN_LANDCOVER where
                  unknown), boxes float32 [N, 4] (x0, y0, x1, y1 pixels, 0 <= x0 < x1 <= W and
                  0 <= y0 < y1 <= H; a box with every value in [0, 1] looks normalised and is refused),
                  box_classes int32 [N], counts int32 [len(TARGET_CLASSES)], dominant int,
                  grid uint8 [3, 3], corrupted int32 [K] (clause indices whose keyword is
                  wrong), true_keywords [K] (their true values); used by evaluation and SCIO
                  repair metrics only, never by training.
"""

from __future__ import annotations

import datetime
import io
import math

import numpy as np
from PIL import Image

from klip_jax.data import knowledge, targets, terrain, world
from klip_jax.errors import RecordError

GEO_FLOATS = ("lon", "lat", "resolution_m", "incidence_deg")
GEO_INTS = ("epsg", "looks")
GEO_STRINGS = ("city", "country", "platform", "band", "polarization", "acquired")
SCENE_TYPES = ("landform", "target")


# Descriptive geo fields a source does not know (ingest's defaults; incidence_deg: NaN).
UNKNOWN = "unknown"

# Real data without a land-cover mask: land cover 255 everywhere and dominant class -1.
UNKNOWN_LANDCOVER = 255
UNKNOWN_CLASS = -1


def truth_from_targets(shape, boxes, box_classes, landcover=None) -> dict:
  """Ground truth from target boxes (pixels) and an optional land-cover mask; what is not
  given is marked unknown so evaluation can skip it."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  box_classes = np.asarray(box_classes, np.int32).reshape(-1)
  grid = np.zeros((3, 3), np.uint8)
  for x0, y0, x1, y1 in boxes:
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    grid[min(int(3 * cy / shape[0]), 2), min(int(3 * cx / shape[1]), 2)] = 1
  known = landcover is not None
  landcover = np.asarray(landcover, np.uint8) if known else np.full(shape, UNKNOWN_LANDCOVER, np.uint8)
  # Over the pixels of a known class only (a mask all UNKNOWN_LANDCOVER has no dominant class,
  # not class 0); values that are no class id are refused by validate_record.
  votes = np.bincount(landcover.ravel(), minlength=len(terrain.LANDCOVER))[:len(terrain.LANDCOVER)]
  dominant = int(votes.argmax()) if known and votes.any() else UNKNOWN_CLASS
  return {"landcover": landcover, "boxes": boxes, "box_classes": box_classes,
          "counts": np.bincount(box_classes, minlength=len(targets.TARGET_CLASSES)).astype(np.int32),
          "dominant": dominant, "grid": grid, "corrupted": np.zeros(0, np.int32), "true_keywords": []}


def true_text(record: dict) -> tuple[list[str], str, list[tuple[int, int]]]:
  """(true keywords, true caption, its keyword spans) of a record: a corrupted clause gets its
  true keyword back (truth.corrupted / truth.true_keywords)."""
  keywords = list(record["keywords"])
  truth = record.get("truth", {})
  for index, keyword in zip(np.asarray(truth.get("corrupted", []), int), truth.get("true_keywords", [])):
    keywords[index] = keyword
  caption, spans = knowledge.replace_keywords(record["caption"], record["spans"], keywords)
  return keywords, caption, spans


def chip_record(chip: world.Chip, text: knowledge.Knowledge) -> dict:
  """A synthetic chip and its knowledge text as a record."""
  return {
      "id": chip.id,
      "image": chip.image,
      "geo": dict(chip.geo),
      "scene_type": chip.scene_type,
      "field_names": list(text.field_names),
      "keywords": list(text.keywords),
      "caption": text.caption,
      "spans": np.asarray(text.spans, np.int32).reshape(-1, 2),
      "truth": {
          "landcover": chip.landcover,
          "boxes": np.asarray([t.box for t in chip.targets], np.float32).reshape(-1, 4),
          "box_classes": np.asarray([t.cls for t in chip.targets], np.int32),
          "counts": chip.counts,
          "dominant": chip.dominant,
          "grid": chip.grid,
          "corrupted": np.asarray(text.corrupted, np.int32),
          "true_keywords": list(text.true_keywords),
      },
  }


# ---------------------------------------------------------------------------------------------
# Validation.


def _fail(record_id, field: str, problem: str) -> None:
  raise RecordError(f"record {record_id!r}: field '{field}' {problem}")


def _get(record: dict, path: str, record_id):
  value = record
  for key in path.split("."):
    if not isinstance(value, dict) or key not in value:
      _fail(record_id, path, "is missing; see klip_jax/data/records.py for the schema.")
    value = value[key]
  return value


def _array(record, path, record_id, dtype, ndim, shape=None) -> np.ndarray:
  value = _get(record, path, record_id)
  if not isinstance(value, np.ndarray):
    _fail(record_id, path, f"must be a numpy array of {np.dtype(dtype).name}, got {type(value).__name__}.")
  if value.dtype != dtype or value.ndim != ndim:
    _fail(record_id, path, f"must be {np.dtype(dtype).name} with {ndim} dims, got {value.dtype} {value.shape}.")
  if shape is not None and any(want is not None and want != got for want, got in zip(shape, value.shape)):
    _fail(record_id, path, f"must have shape {shape}, got {value.shape}.")
  if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
    _fail(record_id, path, "contains NaN or inf.")
  return value


def _number(record, path, record_id, lo=-math.inf, hi=math.inf, unknown_nan=False, integral=False) -> float:
  """A finite number in [lo, hi] (NaN too with `unknown_nan`); `integral`: a whole number, since
  the integer fields are stored as int64 and 2.7 would silently become 2."""
  value = _get(record, path, record_id)
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    _fail(record_id, path, f"must be a number, got {type(value).__name__}.")
  if unknown_nan and math.isnan(value):
    return float(value)
  if not math.isfinite(value):
    _fail(record_id, path, f"must be finite, got {value}.")
  if not lo <= value <= hi:
    _fail(record_id, path, f"is {value}, outside the valid range [{lo}, {hi}].")
  if integral and not float(value).is_integer():
    _fail(record_id, path, f"is {value}; it must be a whole number (it is stored as an integer and would be "
          f"truncated to {int(value)}): give the integer meant.")
  return float(value)


def _string(record, path, record_id, allow_empty=False) -> str:
  value = _get(record, path, record_id)
  if not isinstance(value, str):
    _fail(record_id, path, f"must be a str, got {type(value).__name__}.")
  if not allow_empty and not value.strip():
    _fail(record_id, path, "is empty.")
  return value


def _image(record: dict, rid) -> np.ndarray:
  """uint16 amplitude, or float32 amplitude >= 0 with NaN (no data) but at least one value."""
  image = _get(record, "image", rid)
  if not isinstance(image, np.ndarray) or image.dtype != np.float32:
    return _array(record, "image", rid, np.uint16, 2)
  if image.ndim != 2:
    _fail(rid, "image", f"must have 2 dims, got {image.shape}.")
  if np.isinf(image).any():
    _fail(rid, "image", "contains inf.")
  if np.isnan(image).all():
    _fail(rid, "image", "has no valid pixel (all NaN).")
  if np.nanmin(image) < 0:
    _fail(rid, "image", f"holds negative amplitudes (min {np.nanmin(image)}).")
  return image


def validate_record(record: dict) -> None:
  """Raise RecordError naming the first field that breaks the schema."""
  if not isinstance(record, dict):
    raise RecordError(f"a record must be a dict, got {type(record).__name__}.")
  rid = record.get("id", "<no id>")
  _string(record, "id", rid)
  image = _image(record, rid)
  if min(image.shape) < 8:
    _fail(rid, "image", f"is {image.shape}; chips must be at least 8x8 pixels.")
  _number(record, "geo.lon", rid, -180, 180)
  _number(record, "geo.lat", rid, -90, 90)
  _number(record, "geo.resolution_m", rid, 1e-3, 1e4)
  _number(record, "geo.incidence_deg", rid, 0, 90, unknown_nan=True)
  _number(record, "geo.epsg", rid, 0, integral=True)
  _number(record, "geo.looks", rid, 1, integral=True)
  for key in GEO_STRINGS:
    _string(record, f"geo.{key}", rid)
  try:
    if record["geo"]["acquired"] != UNKNOWN:
      datetime.date.fromisoformat(record["geo"]["acquired"])
  except ValueError:
    _fail(rid, "geo.acquired", f"is {record['geo']['acquired']!r}; use an ISO date like 2021-06-30 "
          f"(or {UNKNOWN!r}).")
  transform = _array(record, "geo.geotransform", rid, np.float64, 1, (6,))
  if transform[1] == 0 or transform[5] == 0:
    _fail(rid, "geo.geotransform", "has a zero pixel size; expected (x0, dx, 0, y0, 0, -dy).")
  scene_type = _string(record, "scene_type", rid)
  if scene_type not in SCENE_TYPES:
    _fail(rid, "scene_type", f"is {scene_type!r}; use one of {SCENE_TYPES}.")
  names = _get(record, "field_names", rid)
  if list(names) != list(knowledge.FIELDS[scene_type]):
    _fail(rid, "field_names", f"must be {knowledge.FIELDS[scene_type]} for a {scene_type} scene, got {names}.")
  caption = _string(record, "caption", rid)
  keywords = _get(record, "keywords", rid)
  clauses = caption.split(knowledge.SEPARATOR)
  spans = _array(record, "spans", rid, np.int32, 2, (len(clauses), 2))
  if len(keywords) != len(clauses):
    _fail(rid, "keywords", f"has {len(keywords)} entries for {len(clauses)} clauses.")
  starts = np.cumsum([0] + [len(c) + len(knowledge.SEPARATOR) for c in clauses[:-1]])
  for i, ((a, b), start, clause) in enumerate(zip(spans.tolist(), starts, clauses)):
    if not start <= a < b <= start + len(clause):
      _fail(rid, "spans", f"row {i} = ({a}, {b}) lies outside clause {i} (characters {start}..{start + len(clause)}).")
    if caption[a:b] != keywords[i]:
      _fail(rid, "spans", f"row {i} covers {caption[a:b]!r} but keyword {i} is {keywords[i]!r}.")
  if "truth" in record:
    _validate_truth(record, rid, image.shape, len(clauses))


def _validate_truth(record, rid, image_shape, num_clauses) -> None:
  _validate_landcover(_array(record, "truth.landcover", rid, np.uint8, 2, image_shape), rid)
  boxes = _array(record, "truth.boxes", rid, np.float32, 2, (None, 4))
  _validate_boxes(boxes, rid, image_shape)
  _array(record, "truth.box_classes", rid, np.int32, 1, (len(boxes),))
  _array(record, "truth.counts", rid, np.int32, 1, (len(targets.TARGET_CLASSES),))
  _array(record, "truth.grid", rid, np.uint8, 2, (3, 3))
  _number(record, "truth.dominant", rid, UNKNOWN_CLASS, len(terrain.LANDCOVER) - 1)
  corrupted = _array(record, "truth.corrupted", rid, np.int32, 1)
  if corrupted.size and (corrupted.min() < 0 or corrupted.max() >= num_clauses):
    _fail(rid, "truth.corrupted", f"holds clause indices outside 0..{num_clauses - 1}.")
  if len(_get(record, "truth.true_keywords", rid)) != len(corrupted):
    _fail(rid, "truth.true_keywords", "must have one entry per corrupted clause.")


def _validate_landcover(landcover: np.ndarray, rid) -> None:
  """Every pixel a class id of terrain.LANDCOVER or UNKNOWN_LANDCOVER: any other value would be
  counted as no class (and a mask of such values gave dominant class 0) without a word."""
  valid = list(range(len(terrain.LANDCOVER))) + [UNKNOWN_LANDCOVER]
  found = np.unique(landcover)
  bad = found[~np.isin(found, valid)]
  if bad.size:
    ids = ", ".join(f"{i} {name}" for i, name in enumerate(terrain.LANDCOVER))
    _fail(rid, "truth.landcover", f"holds values {bad.tolist()} (all values found: {found.tolist()}), which are "
          f"no land-cover class; use the class ids {ids}, or {UNKNOWN_LANDCOVER} for unknown pixels.")


def _validate_boxes(boxes: np.ndarray, rid, image_shape) -> None:
  """Pixel boxes (x0, y0, x1, y1) inside the image with x0 < x1 and y0 < y1: truth_from_targets
  clamps its 3x3 grid, so a normalised, negative, inverted or outside box would give wrong
  truth without a word."""
  height, width = image_shape
  for i, box in enumerate(boxes.tolist()):
    x0, y0, x1, y1 = box
    shown = "(" + ", ".join(f"{v:g}" for v in box) + ")"  # float32 0.1 as 0.1, not 0.10000000149
    if 0 <= min(box) and max(box) <= 1:
      _fail(rid, "truth.boxes", f"row {i} = {shown} has every value in [0, 1], which looks normalised; boxes are "
            f"pixel coordinates (x0, y0, x1, y1): multiply x by the width {width} and y by the height {height}.")
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
      _fail(rid, "truth.boxes", f"row {i} = {shown} is not a box inside the {width}x{height} image; boxes are "
            f"pixel coordinates (x0, y0, x1, y1) with 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}.")


# ---------------------------------------------------------------------------------------------
# Encoding for TFDS / ArrayRecord.


def encode_png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)))


NPY_MAGIC = b"\x93NUMPY"


def encode_image(image: np.ndarray) -> bytes:
  """uint16 -> PNG (as ever); float32 -> .npy bytes (exact, NaN kept; PNG has no floats)."""
  if image.dtype == np.uint16:
    return encode_png(image)
  buffer = io.BytesIO()
  np.save(buffer, np.ascontiguousarray(image, np.float32), allow_pickle=False)
  return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
  if data[:len(NPY_MAGIC)] == NPY_MAGIC:
    return np.load(io.BytesIO(data), allow_pickle=False)
  return decode_png(data)


def tfds_features():
  """The TFDS feature spec of a record (images as PNG bytes: TFDS encodes PNG only with TF)."""
  import tensorflow_datasets as tfds  # heavy; only the builder and readers need it

  text, blob = tfds.features.Text, lambda: tfds.features.Tensor(shape=(), dtype=np.object_)
  tensor = lambda shape, dtype: tfds.features.Tensor(shape=shape, dtype=dtype)
  # tf.train.Example keeps floats as float32 (a metre of longitude, 3 cm of UTM easting); raw
  # bytes keep the float64 geo-referencing exact.
  exact = lambda shape: tfds.features.Tensor(shape=shape, dtype=np.float64,
                                             encoding=tfds.features.Encoding.BYTES)
  geo = {key: exact(()) for key in GEO_FLOATS}
  geo.update({key: tfds.features.Scalar(np.int64) for key in GEO_INTS})
  geo.update({key: text() for key in GEO_STRINGS})
  geo["geotransform"] = exact((6,))
  return tfds.features.FeaturesDict({
      "id": text(), "image": blob(), "geo": geo, "scene_type": text(),
      "field_names": tfds.features.Sequence(text()), "keywords": tfds.features.Sequence(text()),
      "caption": text(), "spans": tensor((None, 2), np.int32),
      "truth": {"landcover": blob(), "boxes": tensor((None, 4), np.float32),
                "box_classes": tensor((None,), np.int32), "counts": tensor((None,), np.int32),
                "dominant": tfds.features.Scalar(np.int32), "grid": tensor((3, 3), np.uint8),
                "corrupted": tensor((None,), np.int32),
                "true_keywords": tfds.features.Sequence(text())},
  })


def to_example(record: dict) -> dict:
  """Record -> TFDS example (PNG-encode the rasters)."""
  geo = dict(record["geo"])
  geo["geotransform"] = np.asarray(geo["geotransform"], np.float64)
  truth = dict(record["truth"])
  truth["landcover"] = encode_png(truth["landcover"])
  return {**record, "image": encode_image(record["image"]), "geo": geo, "truth": truth}


def _text(value):
  return value.decode("utf-8") if isinstance(value, bytes) else value


def from_example(example: dict, decode_rasters: bool = True) -> dict:
  """TFDS example (as read from an ArrayRecord data source) -> record."""
  geo = {key: _text(value) for key, value in example["geo"].items()}
  geo.update({key: float(geo[key]) for key in GEO_FLOATS})
  truth = dict(example["truth"])
  truth["true_keywords"] = [_text(k) for k in truth["true_keywords"]]
  if decode_rasters:
    truth["landcover"] = decode_png(truth["landcover"])
  return {
      "id": _text(example["id"]),
      "image": decode_image(example["image"]) if decode_rasters else example["image"],
      "geo": geo,
      "scene_type": _text(example["scene_type"]),
      "field_names": [_text(n) for n in example["field_names"]],
      "keywords": [_text(k) for k in example["keywords"]],
      "caption": _text(example["caption"]),
      "spans": example["spans"],
      "truth": truth,
  }
