"""Real data in: a JSONL manifest of SAR chips (GeoTIFF, any GDAL raster, or PNG) -> records ->
ArrayRecord.

One JSON object per line (UTF-8); paths are relative to the manifest's folder:

    {"split": "train", "id": "gf3_000123", "image": "chips/gf3_000123.tif",
     "value": "amplitude",            # optional: amplitude | intensity | db | complex (raster.py)
     "band": 2,                        # which band of a multi-band file ([I, Q]: complex in two)
     "nodata": 0,                      # optional: a fill value the file does not declare (a number)
     "scene_type": "target", "caption": "clause one$clause two$...", "keywords": [8 strings],
     "spans": [[start, end], ...],     # optional: else found in each clause (whole words first)
     "geo": {"platform": "Gaofen-3", "band": "C", "polarization": "HH", "incidence_deg": 35.2,
             "looks": 1, "acquired": "2021-06-30", "city": "Shanghai", "country": "China"},
     "truth": {"boxes": [[x0, y0, x1, y1], ...], "box_classes": ["cargo ship", ...],
               "landcover": "masks/gf3_000123.png"}}   # optional

Instead of "caption" and "keywords" a line may carry FUSAR-GEOVL-style field values
({"Terrain": ..., ...}), or take them from a records JSONL joined by image_id (`--records`);
they are verbalised in our clause format (klip_jax/data/fields.py). "id" defaults to "image_id".

`split` is one of builder.SPLITS (default "train"); ids are unique across all splits. The
top-level "band" picks a raster band; "geo"."band" is the radar frequency band. Pixel values
are converted to amplitude as raster.py states (value types, the detection rule, nodata and
NaN masked out); a file with several bands is refused unless "band" picks one.

A GeoTIFF supplies lon/lat of the chip centre, EPSG code, geotransform and resolution (any
CRS; geodesic pixel size for geographic ones); a PNG, or a file without a CRS, needs them in
"geo". The descriptive geo fields are optional: platform, band, polarization, city, country
and acquired default to "unknown", incidence_deg to NaN (unknown), looks to 1.

All chips are square and of one size: `chip_size`, or else that of the first chip. Another
size is refused, not resized (resampling SAR changes its resolution and speckle statistics;
`klip data tile` cuts scenes into chips of the size the model takes). A caption has one
clause per field of its scene type.

Every line is checked (JSON, UTF-8, split, unique id, readable image with valid pixels, size,
text) before anything is written; a bad line raises a one-line RecordError naming the manifest
line, the file and the fix, or with `skip_bad` is left out and reported in `skipped`. The
manifest's, every image's and every land-cover mask's sha256 go into the dataset's metadata: a
rerun after an image or mask changed on disk is refused with the command that rebuilds
(builder.build). Manifests are parsed as JSON only; nothing in them is executed or unpickled.

Truth is optional: "boxes" are pixel coordinates (x0, y0, x1, y1) inside the image, with
0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H (normalised boxes, every value in [0, 1], are
refused: multiply by the image size); "landcover" is a single-band integer PNG of the chip's
size holding terrain.LANDCOVER class ids (0 water .. 5 runway) or 255 where unknown.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

from klip_jax.data import fields, knowledge, raster, records, targets, terrain
from klip_jax.data.builder import SPLITS, command
from klip_jax.errors import DatasetError, RecordError

_CLASS_INDEX = {c.name: i for i, c in enumerate(targets.TARGET_CLASSES)}
GEO_DEFAULTS = {"platform": records.UNKNOWN, "band": records.UNKNOWN, "polarization": records.UNKNOWN,
                "city": records.UNKNOWN, "country": records.UNKNOWN, "acquired": records.UNKNOWN,
                "incidence_deg": math.nan, "looks": 1}


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def read_image(entry: dict, folder: str, where: str) -> tuple[np.ndarray, dict]:
  """(amplitude [H, W], geo fields from the file) of a manifest line's image."""
  name = entry["image"]
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise RecordError(f"{where}: image {name} does not exist (looked for {path}); fix the path, "
                      "relative to the manifest's folder")
  try:
    image = raster.read(path, entry.get("band"), entry.get("nodata"))
    amplitude = raster.to_amplitude(image, entry.get("value"))
  except RecordError as e:
    raise RecordError(f"{where}: image {name} {e}") from None
  if not np.nanmax(amplitude) > 0:
    raise RecordError(f"{where}: image {name} has only zero pixels (an empty chip or an undeclared "
                      "fill value); drop its line, or declare its \"nodata\"")
  return amplitude, image.geo


def read_landcover(folder: str, name: str, where: str) -> np.ndarray:
  """A truth.landcover mask as uint8 class ids: one band of integers in 0..255 (records.py
  refuses values that are no class id); casting a uint16 mask would wrap 257 into class 1."""
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise RecordError(f"{where}: truth.landcover {name} does not exist (looked for {path}); fix the path, "
                      "relative to the manifest's folder")
  with Image.open(path) as image:
    mask = np.asarray(image)
  if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
    raise RecordError(f"{where}: truth.landcover {name} is a {mask.dtype} image of shape {mask.shape}; save "
                      "it as a single-band (grayscale) integer PNG of land-cover class ids")
  if mask.size and (mask.min() < 0 or mask.max() > np.iinfo(np.uint8).max):
    found = np.unique(mask)
    bad = found[(found < 0) | (found > np.iinfo(np.uint8).max)]
    raise RecordError(f"{where}: truth.landcover {name} holds values {bad[:10].tolist()}, which are no "
                      f"land-cover class; use the class ids 0..{len(terrain.LANDCOVER) - 1} "
                      f"({', '.join(terrain.LANDCOVER)}) or {records.UNKNOWN_LANDCOVER} for unknown pixels")
  return mask.astype(np.uint8)


def _check_size(shape: tuple[int, ...], expected: tuple[int, int] | None, origin: str, name: str, where: str):
  if shape[0] != shape[1]:
    raise RecordError(f"{where}: image {name} is {shape[0]}x{shape[1]} pixels; chips must be square: "
                      "cut it with klip data tile --chip N")
  if expected is not None and shape != expected:
    size = expected[0]
    raise RecordError(f"{where}: image {name} is {shape[0]}x{shape[1]} pixels but the chips are "
                      f"{size}x{size} ({origin}); cut it into {size}x{size} chips with klip data tile "
                      f"--chip {size} (chips are not resized)")


def _text(entry: dict, where: str) -> dict:
  """scene_type, field_names, keywords, caption and spans of a manifest line."""
  scene_type = entry["scene_type"]
  if scene_type not in records.SCENE_TYPES:
    raise RecordError(f"{where}: scene_type {scene_type!r} is not a scene type; use one of "
                      f"{list(records.SCENE_TYPES)}")
  fields = knowledge.FIELDS[scene_type]  # fields.caption_entry checked one clause per field
  caption = entry["caption"]
  keywords = list(entry["keywords"])
  spans = entry.get("spans") or _spans(caption, keywords, where)
  return {"scene_type": scene_type, "field_names": list(fields), "keywords": keywords,
          "caption": caption, "spans": np.asarray(spans, np.int32).reshape(-1, 2)}


def _spans(caption: str, keywords: list[str], where: str) -> list[tuple[int, int]]:
  """Each keyword's span in its clause: its one whole-word occurrence (not "port" inside
  "airport", nor "2" inside "12"), else its first occurrence inside a word; a keyword that
  occurs as a whole word more than once needs 'spans' to say which one is meant."""
  spans, offset = [], 0
  for i, (clause, keyword) in enumerate(zip(caption.split(knowledge.SEPARATOR), keywords)):
    words = fields.word_spans(clause, keyword) if keyword else []
    if len(words) > 1:
      raise RecordError(f"{where}: keyword {i} {keyword!r} occurs {len(words)} times as a word in clause {i} "
                        f"{clause!r}; give 'spans' ([start, end] of each keyword in the caption) to say which "
                        "one is meant.")
    at = words[0][0] if words else clause.find(keyword)
    if not keyword or at < 0:
      raise RecordError(f"{where}: keyword {i} {keyword!r} does not occur in clause {i} {clause!r}; "
                        "give 'spans' or fix the keyword.")
    spans.append((offset + at, offset + at + len(keyword)))
    offset += len(clause) + len(knowledge.SEPARATOR)
  return spans


def manifest_record(entry: dict, folder: str, where: str, size: tuple[tuple[int, int], str] | None = None,
                    field_records: fields.RecordIndex | None = None) -> dict:
  """One manifest line -> a record (validated); `size`: the (shape, where it was set) all chips
  share; `field_records`: field values joined by id, verbalised into the caption (fields.py)."""
  entry = fields.caption_entry(entry, where, field_records)
  for key in ("id", "image", "scene_type", "caption", "keywords"):
    if key not in entry:
      raise RecordError(f"{where}: field '{key}' is missing; see klip_jax/data/ingest.py.")
  text = _text(entry, where)
  image, file_geo = read_image(entry, folder, where)
  _check_size(image.shape, *(size or (None, "")), entry["image"], where)
  geo = {**GEO_DEFAULTS, **file_geo, **entry.get("geo", {})}
  missing = [key for key in ("lon", "lat", "epsg", "geotransform", "resolution_m") if key not in geo]
  if missing:
    raise RecordError(f"{where}: image {entry['image']} carries no geo-referencing (no CRS: a PNG, or a "
                      f"product in radar geometry); give {', '.join('geo.' + k for k in missing)} in its line")
  if "geotransform" in geo:
    geo["geotransform"] = np.asarray(geo["geotransform"], np.float64)
  truth = entry.get("truth", {})
  try:
    classes = [_CLASS_INDEX[c] for c in truth.get("box_classes", [])]
  except KeyError as e:
    raise RecordError(f"{where}: unknown target class {e.args[0]!r}; use one of {sorted(_CLASS_INDEX)}.") from None
  landcover = None
  if "landcover" in truth:
    landcover = read_landcover(folder, truth["landcover"], where)
  record = {"id": entry["id"], "image": image, "geo": geo, **text,
            "truth": records.truth_from_targets(image.shape, truth.get("boxes", []), classes, landcover)}
  try:
    records.validate_record(record)
  except RecordError as e:
    raise RecordError(f"{where}: {e}") from None
  return record


def manifest_lines(manifest: str) -> Iterator[tuple[int, bytes]]:
  """(line number, raw bytes) of every line of a JSONL manifest (a UTF-8 BOM dropped)."""
  with open(manifest, "rb") as f:
    raw = f.read()
  return enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1)


def parse_line(data: bytes, where: str) -> dict | None:
  """One manifest line -> its JSON object (None for a blank line); RecordError naming `where`."""
  try:
    line = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise RecordError(f"{where}: is not UTF-8 text (byte 0x{data[e.start]:02x} at column {e.start + 1}); "
                      "save the manifest as UTF-8") from None
  if not line.strip():
    return None
  try:
    entry = json.loads(line)
  except json.JSONDecodeError as e:
    raise RecordError(f"{where}: not JSON ({e}); write one JSON object per line") from None
  if not isinstance(entry, dict):
    raise RecordError(f"{where}: is a JSON {type(entry).__name__}, not an object; write one object per chip")
  return entry


@dataclasses.dataclass
class ManifestSource:
  """A builder record source over a JSONL manifest (see the module docstring)."""

  manifest: str
  skip_bad: bool = False  # leave bad lines out (listed in `skipped`) instead of stopping
  chip_size: int = 0  # the chips' side in pixels; 0: the first chip's
  records: str = ""  # FUSAR-GEOVL-style field records joined by image_id (fields.py)

  def __post_init__(self):
    if not os.path.isfile(self.manifest):
      raise DatasetError(f"no manifest at {self.manifest}; give the JSONL file with --manifest.")
    self._fields = fields.RecordIndex(self.records) if self.records else None
    self._folder = os.path.dirname(os.path.abspath(self.manifest))
    with open(self.manifest, "rb") as f:
      self._sha256 = hashlib.sha256(f.read()).hexdigest()
    self._skipped: list[tuple[int, str]] = []
    self._lines: list[tuple[int, dict]] = []
    first_use: dict[str, int] = {}
    self._validated = False
    for number, data in manifest_lines(self.manifest):
      try:
        entry = self._parse(number, data)
        if entry is None:
          continue
        if entry["id"] in first_use:
          raise RecordError(f"{self._where(number)}: id {entry['id']!r} is already used on line "
                            f"{first_use[entry['id']]}; ids must be unique across all splits: rename one")
        first_use[entry["id"]] = number
        self._lines.append((number, entry))
      except RecordError as e:
        self._bad(number, e)
    self._hashes: dict[int, str] = {}
    self._mask_hashes: dict[int, str] = {}  # of truth.landcover masks, by line
    self._size: tuple[tuple[int, int], str] | None = None
    self._group()
    if self._fields:
      self._fields.check_joined([entry["id"] for _, entry in self._lines], self.manifest)

  def _where(self, number: int) -> str:
    return f"{self.manifest}:{number}"

  def _parse(self, number: int, data: bytes) -> dict | None:
    where = self._where(number)
    entry = parse_line(data, where)
    if entry is None:
      return None
    if "id" not in entry and "image_id" in entry:
      entry["id"] = entry["image_id"]
    split = entry.setdefault("split", "train")
    if split not in SPLITS:
      raise RecordError(f"{where}: split {split!r} is not a split; use one of {list(SPLITS)}")
    if not isinstance(entry.get("id"), str) or not entry["id"].strip():
      raise RecordError(f"{where}: field 'id' is missing or not a string; give every chip a unique id")
    return entry

  def _bad(self, number: int, error: RecordError) -> None:
    if not self.skip_bad:
      raise RecordError(f"{error} (or --skip-bad to ingest the other lines)")
    self._skipped.append((number, str(error)))

  @property
  def skipped(self) -> list[str]:
    """Why each left-out line was bad (with --skip-bad), in manifest order."""
    return [message for _, message in sorted(self._skipped)]

  def _group(self) -> None:
    self._entries: dict[str, list[tuple[int, dict]]] = {}
    for number, entry in self._lines:
      self._entries.setdefault(entry["split"], []).append((number, entry))
    self.num_examples = {split: len(items) for split, items in self._entries.items()}

  def validate(self) -> None:
    """Check every line (reading every image) before TFDS writes anything."""
    if self._validated:
      return
    self._validated = True
    if self.chip_size:
      self._size = ((self.chip_size, self.chip_size), f"--chip-size {self.chip_size}")
    good = []
    for number, entry in self._lines:
      try:
        image = self._record(number, entry)["image"]
        self._hashes[number] = file_sha256(os.path.join(self._folder, entry["image"]))
        if (mask := _mask_name(entry)) is not None:
          self._mask_hashes[number] = file_sha256(os.path.join(self._folder, mask))
      except RecordError as e:
        self._bad(number, e)
        continue
      if self._size is None:
        self._size = (image.shape, f"set by line {number}")
      good.append((number, entry))
    self._lines = good
    self._group()
    if not self.num_examples:
      raise RecordError(f"{self.manifest} lists no usable chips" +
                        (f" ({len(self.skipped)} lines skipped)." if self.skipped else "."))

  def _record(self, number: int, entry: dict) -> dict:
    where = self._where(number)
    try:
      return manifest_record(entry, self._folder, where, self._size, self._fields)
    except (TypeError, ValueError, KeyError, AttributeError, OSError) as e:  # a field of the wrong kind
      problem = " ".join(f"{type(e).__name__}: {e}".split())
      raise RecordError(f"{where}: malformed line ({problem}); see klip_jax/data/ingest.py for the "
                        "format of each field") from None

  def record(self, split: str, index: int) -> dict:
    number, entry = self._entries[split][index]
    record = self._record(number, entry)
    for kind, name, hashes in (("image", entry["image"], self._hashes),
                               ("truth.landcover", _mask_name(entry), self._mask_hashes)):
      if number in hashes and file_sha256(os.path.join(self._folder, name)) != hashes[number]:
        raise RecordError(f"{self._where(number)}: {kind} {name} changed while the dataset was being built; "
                          "run the build again")
    return record

  def as_metadata(self) -> dict:
    meta = {"manifest": os.path.abspath(self.manifest), "sha256": self._sha256,
            "num_examples": self.num_examples,
            "images": {str(number): [entry["image"], self._hashes.get(number)] for number, entry in self._lines}}
    masks = {str(number): [_mask_name(entry), self._mask_hashes.get(number)] for number, entry in self._lines
             if _mask_name(entry) is not None}
    if masks:  # only then: a dataset without masks keeps the metadata it was built with
      meta["masks"] = masks
    if self._fields:
      meta["records"] = {"path": os.path.abspath(self.records), "sha256": self._fields.sha256}
    return meta

  def describe_change(self, existing: dict | None, data_dir) -> str | None:
    """What differs between this manifest (and its images) and the one a dataset was built
    from, with the command that rebuilds it; None when it was not built from a manifest."""
    if not existing or "manifest" not in existing:
      return None
    fix = command(self.as_metadata(), data_dir, "--rebuild")
    if existing["manifest"] != os.path.abspath(self.manifest):
      return (f"{data_dir} holds a dataset built from another manifest ({existing['manifest']}); "
              f"choose another --out folder, or replace it: {fix}")
    meta = self.as_metadata()
    for kind, key in (("image", "images"), ("truth.landcover", "masks")):
      old = existing.get(key, {})
      for number, (name, digest) in meta.get(key, {}).items():
        if number in old and old[number][0] == name and old[number][1] != digest:
          return (f"{self._where(int(number))}: {kind} {name} changed on disk since the dataset at {data_dir} "
                  f"was built; rebuild it: {fix}")
    return (f"{self.manifest} changed since the dataset at {data_dir} was built from it (lines, "
            f"images, land-cover masks or skipped lines differ); rebuild it: {fix}")


def _mask_name(entry: dict) -> str | None:
  """The truth.landcover mask a (validated) manifest line names, if any."""
  truth = entry.get("truth")
  return truth.get("landcover") if isinstance(truth, dict) else None
