"""HCoT prompts for chips without text, and an LLM's answers back as field records.

FUSAR-GEOVL's texts came from an LLM prompted with a hierarchical cognitive chain of thought:
geoscience (where is this lon/lat) -> social development and regional function -> SAR
scattering at the sensor's band and polarisation -> instance identification from sizes at the
chip's resolution -> a cross-level consistency check, ending in the eight fields of the chip's
scene type. klip_jax calls no LLM: `klip data hcot-prompts` writes those prompts, one JSON line
per chip of a manifest that has no caption, no field values and no field record (--records)
yet; you run them through the
LLM of your choice (attaching the chip's image where the LLM sees images); `klip data
hcot-parse` turns its answers into field records for `klip data ingest --records`.

prompts.jsonl, one line per chip:
    {"image_id", "image": path, "scene_type": "landform" | "target" | null (the LLM decides),
     "fields": [the field names asked for], "levels": [{"level": 1..5, "name", "prompt"}],
     "answer_format": the JSON the answer must be, "prompt": levels + answer format as one message}

answers.jsonl, one line per chip: {"image_id", "answer": "<the LLM's reply>"} ("response",
"content" or "text" also name the reply), or the reply's JSON object itself. The reply may wrap
the JSON in prose or a ``` fence; the first JSON object in it is read. An answer is rejected,
with its reason, when it is not JSON, has no image_id, holds no JSON object, repeats an
image_id, or its fields do not make a field record (fields.parse: the wrong number of fields for
its scene type, an unknown field, an empty value, a "$" in a value). Keywords the LLM gives
that do not occur in their value are dropped (the head-phrase rule picks those), and counted.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os

from klip_jax import io
from klip_jax.data import fields, ingest, knowledge, raster, targets
from klip_jax.errors import RecordError

LEVELS = ("geoscience", "social development and regional function", "SAR scattering",
          "instance identification", "consistency check")
WAVELENGTH_CM = {"Ka": 0.9, "Ku": 2.0, "X": 3.1, "C": 5.6, "S": 9.4, "L": 23.5, "P": 70.0}
_BAND_NOTE = {
    "short": "a short wavelength scatters from leaves and canopy tops and shows fine texture and small "
             "objects, with little penetration",
    "C": "a medium wavelength responds to crops, canopy tops and sea state, with little penetration",
    "long": "a long wavelength penetrates vegetation canopies and dry sand, trunks over ground give double "
            "bounce, and smooth surfaces look darker than at short wavelengths",
}
_POL_NOTE = {
    "HH": "co-polarised HH gives strong double bounce from buildings and ship hulls and a good land/water "
          "contrast",
    "VV": "co-polarised VV is the most sensitive to sea-surface roughness from wind and waves, and to surface "
          "scattering",
    "cross": "cross-polarised returns come from volume scattering in vegetation and from oriented structures; "
             "water and smooth surfaces are very dark",
}
# What each field's value should say (the answer format's guide).
GUIDE = {
    "landform": {
        "terrain": "the landform type (e.g. coastal plain, hilly area, river valley, urban area)",
        "functionality": "the region's main function (e.g. agricultural production, port logistics, "
                         "residential and commercial activity)",
        "distribution": "where the main land covers lie in the image (e.g. water mainly in the upper left)",
        "layout": "the overall spatial layout (e.g. a regular street grid, a patchwork of field parcels)",
        "boundary": "the land covers that meet at the clearest boundary (e.g. water and buildings)",
        "buildings": "how buildings appear and are spread (e.g. densely built, sparsely scattered, absent)",
        "roads": "the road network (e.g. dense and grid-like, a few straight roads, absent)",
        "water": "the water body type (e.g. a winding river, an enclosed lake, open sea, absent)",
    },
    "target": {
        "count": "the number of targets, an integer",
        "location": "the cells of a 3x3 grid that hold targets (" + ", ".join(knowledge.CELL_NAMES) + ")",
        "feature": "the targets' scattering features and the orientation of their main axes (e.g. north-south)",
        "size": "the length of the largest target in metres, a number",
        "category": "the target class (e.g. " + ", ".join(c.plural for c in targets.TARGET_CLASSES) + ")",
        "distribution": "how the targets are arranged (e.g. isolated, arranged in a row, clustered together)",
        "region": "the city and country nearest the scene",
        "environment": "the targets' surroundings (e.g. open sea, a coastal harbour, an airport apron)",
    },
}
_REFERENCE_SIZES = tuple((c.name, f"{round(sum(c.length_m) / 2)} m", round(sum(c.length_m) / 2))
                         for c in targets.TARGET_CLASSES) + (("detached house", "15 m", 15), ("road", "10 m wide", 10))


@dataclasses.dataclass(frozen=True)
class Chip:
  """What the prompts say about one chip (None: not known)."""

  image_id: str
  image: str
  scene_type: str | None
  lon: float
  lat: float
  resolution_m: float
  width: int
  height: int
  platform: str | None = None
  band: str | None = None
  polarization: str | None = None
  incidence_deg: float | None = None
  looks: int | None = None
  acquired: str | None = None
  city: str | None = None
  country: str | None = None


def _raster_geo(path: str) -> dict:
  """Size, centre lon/lat and ground pixel size of an image file, from its header only (the
  geo-referencing ingest stores, raster.file_geo)."""
  if not path.lower().endswith((".tif", ".tiff")):
    from PIL import Image

    with Image.open(path) as image:
      return {"width": image.width, "height": image.height}
  import rasterio  # only GeoTIFF chips need GDAL

  with rasterio.open(path) as src:
    geo = raster.file_geo(src)
    return {"width": src.width, "height": src.height,
            **{k: geo[k] for k in ("lon", "lat", "resolution_m") if k in geo}}


def chip_of(entry: dict, folder: str, where: str) -> Chip:
  """A manifest line -> Chip (geo from the line, else from the image's header)."""
  image_id = fields.chip_id(entry)
  if not isinstance(image_id, str) or not image_id:
    raise RecordError(f"{where}: no \"id\" (or \"image_id\") naming the chip.")
  if "image" not in entry:
    raise RecordError(f"{where}: field 'image' is missing; give the chip's file.")
  path = os.path.join(folder, entry["image"])
  if not os.path.exists(path):
    raise RecordError(f"{where}: image {path} does not exist.")
  try:
    geo = {**_raster_geo(path), **entry.get("geo", {})}
  except (OSError, ValueError) as e:  # rasterio's and PIL's unreadable-file errors are OSErrors
    raise RecordError(f"{where}: cannot read the header of {path} ({type(e).__name__}: {e}).") from None
  where_fix = "a GeoTIFF with a CRS, or geo.lon and geo.lat"
  for key, what, fix in (("lon", "location (geoscience level)", where_fix),
                         ("lat", "location (geoscience level)", where_fix),
                         ("resolution_m", "ground resolution (instance level)",
                          "a GeoTIFF with a CRS, or geo.resolution_m")):
    if not isinstance(geo.get(key), (int, float)):
      raise RecordError(f"{where}: the prompts need the chip's {what}; give {fix}.")
  scene_type = entry.get("scene_type")
  if scene_type is not None and scene_type not in knowledge.FIELDS:
    raise RecordError(f"{where}: scene_type is {scene_type!r}; use 'landform' or 'target', or leave it out.")
  known = {k: geo.get(k) for k in ("platform", "band", "polarization", "incidence_deg", "looks", "acquired",
                                   "city", "country")}
  return Chip(image_id, path, scene_type, float(geo["lon"]), float(geo["lat"]), float(geo["resolution_m"]),
              int(geo["width"]), int(geo["height"]), **known)


# ---------------------------------------------------------------------------------------------
# The five levels.


def _geoscience(chip: Chip) -> str:
  place = f", in or near {chip.city}, {chip.country}" if chip.city and chip.country else ""
  return (f"Level 1, geoscience. The SAR chip is centred at longitude {chip.lon:.4f}, latitude {chip.lat:.4f} "
          f"(WGS84){place}. From this location, describe the geographic setting: the climate zone, the "
          "landforms and terrain to expect (plain, hills, coast, river valley, ...), and nearby water bodies "
          "and coastline.")


def _social(chip: Chip) -> str:
  del chip
  return ("Level 2, social development and regional function. Given that setting, how developed is the "
          "area (urban core, suburb, village, farmland, port, airport, wilderness), and what is its main "
          "regional function (residential and commercial activity, industry, agriculture, transport, port "
          "logistics, ecological conservation)? Which man-made structures should appear: buildings, roads, "
          "runways, piers?")


def _scattering(chip: Chip) -> str:
  band = (chip.band or "").strip()
  if band in WAVELENGTH_CM:
    kind = "short" if WAVELENGTH_CM[band] < 4 else "C" if band == "C" else "long"
    sensor = f"{band}-band (wavelength about {WAVELENGTH_CM[band]:g} cm; {_BAND_NOTE[kind]})"
  else:
    sensor = "an unstated band (judge the wavelength from the image's texture)"
  pol = (chip.polarization or "").strip().upper()
  if pol in ("HH", "VV"):
    sensor += f", {pol} polarisation ({_POL_NOTE[pol]})"
  elif pol in ("HV", "VH"):
    sensor += f", {pol} polarisation ({_POL_NOTE['cross']})"
  else:
    sensor += ", an unstated polarisation"
  extra = [s for s in (f"by {chip.platform}" if chip.platform else "",
                       f"at {chip.incidence_deg:g} degrees incidence" if chip.incidence_deg else "",
                       f"with {chip.looks} look{'s' if chip.looks != 1 else ''}" if chip.looks else "",
                       f"on {chip.acquired}" if chip.acquired else "") if s]
  return (f"Level 3, SAR scattering. The image was acquired in {sensor}{' ' + ', '.join(extra) if extra else ''}. "
          "Explain how the scene's surfaces appear at this band and polarisation: calm water (dark, specular), "
          "rough sea, bare soil, vegetation (volume scattering), buildings (bright double bounce, layover), "
          "ships and aircraft (bright point scatterers with cross-shaped sidelobes) and radar shadow; then "
          "say which of them this image shows and where.")


def _instances(chip: Chip) -> str:
  res = chip.resolution_m
  sizes = ", ".join(f"{name} ({size}) about {_pixels(metres, res)}" for name, size, metres in _REFERENCE_SIZES)
  return (f"Level 4, instance identification. The chip is {chip.width} x {chip.height} pixels at {res:.3g} m per "
          f"pixel, about {chip.width * res:,.0f} m x {chip.height * res:,.0f} m on the ground. At this "
          f"resolution: {sizes}. Identify the instances in the image from their extents in pixels, count "
          "them, place them in a 3x3 grid of the chip and give their sizes in metres; an object a few "
          "pixels across cannot be identified, say so rather than guess.")


def _pixels(metres: float, res: float) -> str:
  n = metres / res
  return "under 1 pixel" if n < 1 else f"{math.floor(n + 0.5):,} pixel{'s' if n >= 1.5 else ''}"


def _consistency(chip: Chip) -> str:
  del chip
  return ("Level 5, consistency check. Check levels 1-4 against each other and against the image: ships lie "
          "on water and aircraft on aprons or runways; sizes must fit the resolution and the class; the "
          "regional function must fit the terrain and the buildings; the count must match the locations "
          "named. Correct whatever is inconsistent, then write the answer.")


def answer_format(chip: Chip) -> str:
  """The JSON the answer must be, with what each field's value should say."""
  types = (chip.scene_type,) if chip.scene_type else ("target", "landform")
  lines = []
  if not chip.scene_type:
    lines.append('First decide the scene type: "target" when ships or aircraft are the subject, otherwise '
                 '"landform"; then give that type\'s eight fields.')
  for scene in types:
    guide = "; ".join(f"{fields.display_name(n)}: {GUIDE[scene][n]}" for n in knowledge.FIELDS[scene])
    lines.append(f"A {scene} scene has the fields {guide}.")
  example = types[0]
  skeleton = {"image_id": chip.image_id, "scene_type": example,
              **{fields.display_name(n): "..." for n in knowledge.FIELDS[example]},
              "keywords": {fields.display_name(n): "..." for n in knowledge.FIELDS[example]}}
  lines.append("Each value is one phrase of at most 20 words that starts with its key fact. Under "
               '"keywords" give, for every field, the 1-4 word key phrase copied verbatim from its value. '
               "Answer with one JSON object and nothing else, like: " + json.dumps(skeleton, ensure_ascii=False))
  return "\n".join(lines)


def prompt(chip: Chip) -> dict:
  """The prompt line of one chip."""
  texts = [level(chip) for level in (_geoscience, _social, _scattering, _instances, _consistency)]
  levels = [{"level": i + 1, "name": name, "prompt": text} for i, (name, text) in enumerate(zip(LEVELS, texts))]
  spec = answer_format(chip)
  intro = ("You are an expert in SAR image interpretation. Reason through the five levels below in order, "
           "about the attached SAR image chip, and finish with the JSON answer.")
  names = knowledge.FIELDS[chip.scene_type] if chip.scene_type else knowledge.FIELDS["target"] + \
      knowledge.FIELDS["landform"]
  return {"image_id": chip.image_id, "image": chip.image, "scene_type": chip.scene_type,
          "fields": [fields.display_name(n) for n in dict.fromkeys(names)], "levels": levels,
          "answer_format": spec, "prompt": "\n\n".join([intro, *texts, spec])}


def _manifest_lines(manifest: str):
  """(line number, entry) of every non-empty line; RecordError naming the line otherwise."""
  if not os.path.exists(manifest):
    raise RecordError(f"no manifest at {manifest}.")
  for number, data in ingest.manifest_lines(manifest):
    entry = ingest.parse_line(data, f"{manifest}:{number}")
    if entry is not None:
      yield number, entry


def write_prompts(manifest: str, out: str, records: str = "") -> dict:
  """Prompts for the manifest's chips without text (no caption, no field values, no field
  record in `records`) -> `out`; {"prompts", "with_text"}."""
  folder = os.path.dirname(os.path.abspath(manifest))
  have = set(fields.RecordIndex(records).by_id) if records else set()
  lines, with_text, seen = [], 0, {}
  for number, entry in _manifest_lines(manifest):
    where = f"{manifest}:{number}"
    if "caption" in entry or fields.has_fields(entry) or fields.chip_id(entry) in have:
      with_text += 1
      continue
    chip = chip_of(entry, folder, where)
    if chip.image_id in seen:
      raise RecordError(f"{where}: id {chip.image_id!r} repeats line {seen[chip.image_id]}; give each chip one id.")
    seen[chip.image_id] = number
    lines.append(prompt(chip))
  io.write_jsonl(out, lines)
  return {"prompts": len(lines), "with_text": with_text}


# ---------------------------------------------------------------------------------------------
# Answers back.

_REPLY_KEYS = ("answer", "response", "content", "text")


@dataclasses.dataclass(frozen=True)
class Rejection:
  where: str
  image_id: str | None
  kind: str
  reason: str

  def __str__(self) -> str:
    return f"{self.where}{f' ({self.image_id})' if self.image_id else ''}: rejected: {self.reason}"


def json_object(reply: str) -> dict | None:
  """The first JSON object in an LLM's reply (prose and ``` fences around it are ignored)."""
  decoder = json.JSONDecoder()
  at = reply.find("{")
  while at >= 0:
    try:
      value, _ = decoder.raw_decode(reply, at)
      if isinstance(value, dict):
        return value
    except json.JSONDecodeError:
      pass
    at = reply.find("{", at + 1)
  return None


def _answer(line: str, where: str) -> tuple[dict, str | None]:
  """(the answer's field object, its image_id) of one answers line; Rejection on failure."""
  try:
    outer = json.loads(line)
  except json.JSONDecodeError as e:
    raise _Rejected(Rejection(where, None, "not JSON", f"the line is not JSON ({e.msg}, column {e.colno})")) \
        from None
  if not isinstance(outer, dict):
    raise _Rejected(Rejection(where, None, "not JSON", "the line is not a JSON object"))
  image_id = outer.get("image_id")
  reply = next((outer[k] for k in _REPLY_KEYS if isinstance(outer.get(k), str)), None)
  if reply is None:
    if not fields.has_fields(outer):
      raise _Rejected(Rejection(where, image_id, "no answer", f"no reply under {'/'.join(_REPLY_KEYS)} and no "
                                "field values on the line"))
    inner = outer
  else:
    inner = json_object(reply)
    if inner is None:
      shown = " ".join(reply.split())[:60]
      raise _Rejected(Rejection(where, image_id, "no JSON object",
                                f"the reply holds no JSON object (it begins {shown!r})"))
  inner_id = inner.get("image_id")
  if image_id and inner_id and inner_id != image_id:
    raise _Rejected(Rejection(where, image_id, "image_id mismatch",
                              f"the reply's image_id {inner_id!r} differs from the line's {image_id!r}"))
  image_id = image_id or inner_id
  if not isinstance(image_id, str) or not image_id:
    raise _Rejected(Rejection(where, None, "no image_id", "no image_id on the line or in the reply"))
  return inner, image_id


class _Rejected(Exception):
  def __init__(self, rejection: Rejection):
    super().__init__(str(rejection))
    self.rejection = rejection


def _drop_stray_keywords(inner: dict) -> tuple[dict, int]:
  """The answer without keywords that do not occur in their field's value (the LLM paraphrased);
  the head-phrase rule picks those."""
  given = inner.get("keywords")
  if not isinstance(given, dict):
    return inner, 0
  values = {str(k).strip().lower(): v for k, v in inner.items() if k not in fields.RECORD_KEYS}
  if isinstance(inner.get("fields"), dict):
    values = {str(k).strip().lower(): v for k, v in inner["fields"].items()}
  kept = {k: v for k, v in given.items()
          if isinstance(v, str) and isinstance(values.get(str(k).strip().lower()), str)
          and " ".join(v.split()).lower() in " ".join(values[str(k).strip().lower()].split()).lower()}
  return {**inner, "keywords": kept}, len(given) - len(kept)


def parse_answers(path: str) -> tuple[list[fields.FieldRecord], list[Rejection], int]:
  """(field records, rejections, keywords dropped) of an answers JSONL."""
  if not os.path.exists(path):
    raise RecordError(f"no answers file at {path}.")
  with open(path, "rb") as f:
    raw = f.read()
  accepted: list[fields.FieldRecord] = []
  rejected: list[Rejection] = []
  seen: dict[str, str] = {}
  dropped = 0
  for number, line in enumerate(raw.split(b"\n"), 1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      try:
        text = line.decode("utf-8")
      except UnicodeDecodeError:
        raise _Rejected(Rejection(where, None, "not UTF-8", "the line is not UTF-8 text")) from None
      inner, image_id = _answer(text, where)
      if image_id in seen:
        raise _Rejected(Rejection(where, image_id, "duplicate image_id", f"image_id repeats {seen[image_id]}"))
      inner, n = _drop_stray_keywords(inner)
      try:
        record = fields.parse({**inner, "image_id": image_id}, where)
      except fields.FieldError as e:
        raise _Rejected(Rejection(where, image_id, e.kind, e.reason)) from None
    except _Rejected as e:
      rejected.append(e.rejection)
      continue
    seen[image_id] = where
    dropped += n
    accepted.append(record)
  return accepted, rejected, dropped


def write_records(accepted: list[fields.FieldRecord], rejected: list[Rejection], answers: str, out: str) -> None:
  """Write the accepted field records to `out` (JSONL, FUSAR-GEOVL style); RecordError when no
  answer of `answers` could be used (nothing is written then)."""
  if not accepted:
    reasons = summary(rejected)
    raise RecordError(f"no usable answer in {answers} ({reasons or 'the file is empty'}); see the reasons "
                      "above, fix the answers or re-ask the LLM.")
  io.write_jsonl(out, [r.as_json() for r in accepted])


def summary(rejected: list[Rejection]) -> str:
  """"3 field count, 1 no JSON object": rejections by kind, most frequent first."""
  counts = collections.Counter(r.kind for r in rejected)
  return ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
