"""Real data in: a JSONL manifest of SAR chips (GeoTIFF or PNG) -> records -> ArrayRecord.

One JSON object per line; paths are relative to the manifest's folder:

    {"split": "train", "id": "gf3_000123", "image": "chips/gf3_000123.tif",
     "scene_type": "target", "caption": "clause one$clause two$...", "keywords": [8 strings],
     "spans": [[start, end], ...],             # optional: else found in each clause
     "geo": {"platform": "Gaofen-3", "band": "C", "polarization": "HH", "incidence_deg": 35.2,
             "looks": 1, "acquired": "2021-06-30", "city": "Shanghai", "country": "China"},
     "truth": {"boxes": [[x0, y0, x1, y1], ...], "box_classes": ["cargo ship", ...],
               "landcover": "masks/gf3_000123.png"}}   # optional

Instead of "caption" and "keywords" a line may carry FUSAR-GEOVL-style field values
({"Terrain": ..., ...}), or take them from a records JSONL joined by image_id (`--records`);
they are verbalised in our clause format (klip_jax/data/fields.py).

A GeoTIFF (read with rasterio) supplies lon/lat of the chip centre, EPSG code, geotransform and
resolution; a PNG needs them in "geo". Images must be single-band uint16 (or uint8) amplitude.
Every record is validated, with the manifest line in the error, before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import pyproj
from PIL import Image

from klip_jax.data import fields, knowledge, records, targets
from klip_jax.errors import RecordError

_CLASS_INDEX = {c.name: i for i, c in enumerate(targets.TARGET_CLASSES)}


def _read_raster(path: str) -> tuple[np.ndarray, dict]:
  """(band 1, geo fields a GeoTIFF carries) of an image file."""
  if path.lower().endswith((".tif", ".tiff")):
    import rasterio  # only ingest needs GDAL

    with rasterio.open(path) as src:
      data = src.read(1)
      geo = {}
      if src.crs is not None and src.crs.to_epsg():
        a, b, c, d, e, f = tuple(src.transform)[:6]
        geo["epsg"] = int(src.crs.to_epsg())
        geo["geotransform"] = np.array([c, a, b, f, d, e], np.float64)
        x, y = src.xy(src.height / 2, src.width / 2, offset="ul")
        lon, lat = pyproj.Transformer.from_crs(src.crs.to_wkt(), 4326, always_xy=True).transform(x, y)
        geo.update(lon=float(lon), lat=float(lat))
        if src.crs.is_projected:
          geo["resolution_m"] = float(abs(a))
      return data, geo
  return np.asarray(Image.open(path)), {}


def _image(path: str, where: str) -> tuple[np.ndarray, dict]:
  if not os.path.exists(path):
    raise RecordError(f"{where}: image {path} does not exist.")
  data, geo = _read_raster(path)
  if data.ndim != 2:
    raise RecordError(f"{where}: image {path} has shape {data.shape}; give one band of amplitude.")
  if data.dtype == np.uint8:
    data = data.astype(np.uint16)
  if data.dtype != np.uint16:
    raise RecordError(f"{where}: image {path} is {data.dtype}; convert it to uint16 amplitude "
                      "(e.g. np.clip(np.rint(a), 0, 65535).astype(np.uint16)).")
  return data, geo


def _spans(caption: str, keywords: list[str], where: str) -> list[tuple[int, int]]:
  spans, offset = [], 0
  for i, (clause, keyword) in enumerate(zip(caption.split(knowledge.SEPARATOR), keywords)):
    at = clause.find(keyword)
    if not keyword or at < 0:
      raise RecordError(f"{where}: keyword {i} {keyword!r} does not occur in clause {i} {clause!r}; "
                        "give 'spans' or fix the keyword.")
    spans.append((offset + at, offset + at + len(keyword)))
    offset += len(clause) + len(knowledge.SEPARATOR)
  return spans


def manifest_record(entry: dict, folder: str, where: str, field_records: fields.RecordIndex | None = None) -> dict:
  """One manifest line -> a record (validated)."""
  entry = fields.caption_entry(entry, where, field_records)
  for key in ("id", "image", "scene_type", "caption", "keywords"):
    if key not in entry:
      raise RecordError(f"{where}: field '{key}' is missing; see klip_jax/data/ingest.py.")
  image, file_geo = _image(os.path.join(folder, entry["image"]), where)
  geo = {**file_geo, **entry.get("geo", {})}
  if "geotransform" in geo:
    geo["geotransform"] = np.asarray(geo["geotransform"], np.float64)
  scene_type = entry["scene_type"]
  keywords = list(entry["keywords"])
  spans = entry.get("spans") or _spans(entry["caption"], keywords, where)
  truth = entry.get("truth", {})
  try:
    classes = [_CLASS_INDEX[c] for c in truth.get("box_classes", [])]
  except KeyError as e:
    raise RecordError(f"{where}: unknown target class {e.args[0]!r}; use one of {sorted(_CLASS_INDEX)}.") from None
  landcover = None
  if "landcover" in truth:
    landcover = np.asarray(Image.open(os.path.join(folder, truth["landcover"])), np.uint8)
  record = {
      "id": entry["id"], "image": image, "geo": geo, "scene_type": scene_type,
      "field_names": list(knowledge.FIELDS.get(scene_type, ())), "keywords": keywords,
      "caption": entry["caption"], "spans": np.asarray(spans, np.int32).reshape(-1, 2),
      "truth": records.truth_from_targets(image.shape, truth.get("boxes", []), classes, landcover),
  }
  try:
    records.validate_record(record)
  except RecordError as e:
    raise RecordError(f"{where}: {e}") from None
  return record


@dataclasses.dataclass
class ManifestSource:
  """A builder record source over a JSONL manifest (see the module docstring)."""

  manifest: str
  records: str = ""  # FUSAR-GEOVL-style field records joined by image_id (fields.py)

  def __post_init__(self):
    if not os.path.exists(self.manifest):
      raise RecordError(f"no manifest at {self.manifest}.")
    self._fields = fields.RecordIndex(self.records) if self.records else None
    self._folder = os.path.dirname(os.path.abspath(self.manifest))
    self._entries: dict[str, list[tuple[int, dict]]] = {}
    with open(self.manifest, "rb") as f:
      raw = f.read()
    self._sha256 = hashlib.sha256(raw).hexdigest()
    for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
      except json.JSONDecodeError as e:
        raise RecordError(f"{self.manifest}:{number}: not JSON ({e}).") from None
      self._entries.setdefault(entry.get("split", "train"), []).append((number, entry))
    self.num_examples = {split: len(items) for split, items in self._entries.items()}
    if self._fields:
      self._fields.check_joined([fields.chip_id(e) for items in self._entries.values() for _, e in items],
                                self.manifest)

  def validate(self) -> None:
    if not self.num_examples:
      raise RecordError(f"{self.manifest} lists no chips.")
    for split, items in self._entries.items():
      for index in range(len(items)):
        self.record(split, index)  # fail before TFDS writes anything

  def record(self, split: str, index: int) -> dict:
    number, entry = self._entries[split][index]
    return manifest_record(entry, self._folder, f"{self.manifest}:{number}", self._fields)

  def as_metadata(self) -> dict:
    meta = {"manifest": os.path.abspath(self.manifest), "sha256": self._sha256,
            "num_examples": self.num_examples}
    if self._fields:
      meta["records"] = {"path": os.path.abspath(self.records), "sha256": self._fields.sha256}
    return meta
