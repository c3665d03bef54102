"""HCoT knowledge text: the eight structured fields of a chip and their verbalisation.

FUSAR-KLIP's captions come from an LLM prompted with a hierarchical chain of thought
(geography -> regional function -> scattering physics -> instances -> consistency check). Here
the same eight fields are derived exactly from the synthetic world's ground truth and geo
metadata, so every clause has a known true value. Each field is verbalised with one of several
fixed templates into one clause; clauses are joined by "$". The filled-in part of each clause
is its keyword, whose character span in the caption is kept: the keyword-reconstruction loss
masks exactly those characters' tokens, and SCIO repairs them.

The real captions are noisy (64-90% correct per field), so a noise option replaces a chosen
fraction of keywords with plausible wrong values of the same field and records, per corrupted
clause, its index and the true keyword: the SCIO repair metrics are measured against that.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from klip_jax.data import gazetteer, targets, terrain, world

SEPARATOR = "$"

LANDFORM_FIELDS = ("terrain", "functionality", "distribution", "layout", "boundary",
                   "buildings", "roads", "water")
TARGET_FIELDS = ("count", "location", "feature", "size", "category", "distribution",
                 "region", "environment")
FIELDS = {"landform": LANDFORM_FIELDS, "target": TARGET_FIELDS}
# Every (scene type, field) as one index: what SCIO calibrates screening and draws candidate
# keywords by, whatever clause position a field sits at after a clause was dropped.
FIELD_SLOTS = tuple((scene, name) for scene, names in FIELDS.items() for name in names)
MAX_CLAUSES = max(len(names) for names in FIELDS.values())
# Fields no SAR chip can show: a target scene's city and country (from speckle).
IMAGE_BLIND = (("target", "region"),)


def slot_names() -> tuple[str, ...]:
  """FIELD_SLOTS as "scene_type.field" names, how configs and reports spell a field."""
  return tuple(f"{scene}.{name}" for scene, name in FIELD_SLOTS)


def field_slots(scene_type: str, field_names) -> np.ndarray:
  """int32 [MAX_CLAUSES]: the FIELD_SLOTS index of each clause's field, -1 past the last clause
  and for fields outside the schema."""
  out = np.full(MAX_CLAUSES, -1, np.int32)
  for k, name in enumerate(list(field_names)[:MAX_CLAUSES]):
    if (scene_type, name) in FIELD_SLOTS:
      out[k] = FIELD_SLOTS.index((scene_type, name))
  return out

CELL_NAMES = ("upper left", "upper middle", "upper right", "middle left", "centre",
              "middle right", "lower left", "lower middle", "lower right")
COVER_NAMES = ("water", "vegetation", "bare land", "buildings", "roads", "runways")

# Value vocabularies. Noise draws a wrong value of the same field from these (numbers and
# free-form values such as cell lists have their own corruption rules below).
_TERRAIN = {"farmland": "agricultural plain", "river": "river plain", "lake": "lakeside plain",
            "coast": "coastal zone", "hills": "hilly area", "urban": "urban area",
            "harbor": "coastal port area", "sea": "open sea", "airport": "airport area"}
_LAYOUT = {"farmland": "a patchwork of field parcels", "river": "a winding linear water course",
           "lake": "an enclosed water body amid fields", "coast": "a curved shoreline",
           "hills": "undulating ridges and valleys", "urban": "a regular street grid",
           "harbor": "piers reaching into the water", "sea": "an almost uniform water surface",
           "airport": "long straight paved strips"}
_FUNCTION = {terrain.WATER: "water supply and navigation",
             terrain.VEGETATION: "agricultural production",
             terrain.BARE: "ecological conservation",
             terrain.URBAN: "residential and commercial activity",
             terrain.ROAD: "transportation", terrain.RUNWAY: "air transport"}
_BUILDINGS = ("densely built", "sparsely scattered", "absent")
_ROADS = ("dense and grid-like", "sparse with a few straight roads", "absent")
_WATER = ("absent", "a winding river", "an enclosed lake", "open sea", "small ponds")
_ORIENTATION = ("north-south", "east-west", "northeast-southwest", "northwest-southeast",
                "in various directions")
_TARGET_DISTRIBUTION = {"single": "isolated", "row": "arranged in a row",
                        "cluster": "clustered together", "scattered": "scattered across the scene"}
_ENVIRONMENT = ("open sea", "a coastal harbour", "an airport apron", "a river channel")

TEMPLATES = {
    "landform": {
        "terrain": ("the terrain in this sar image is classified as {}",
                    "this scene shows {}",
                    "the landform type of the image is {}"),
        "functionality": ("the main function of this region is {}",
                          "this area mainly serves {}",
                          "regional function analysis points to {}"),
        "distribution": ("the land cover distribution shows {}",
                         "spatially the scene has {}",
                         "the distribution of ground objects is {}"),
        "layout": ("the overall layout is {}",
                   "the scene is organised as {}",
                   "its spatial layout appears as {}"),
        "boundary": ("the clearest boundary lies between {}",
                     "a distinct edge separates {}",
                     "boundaries are visible between {}"),
        "buildings": ("buildings in the image are {}",
                      "the buildings are {}",
                      "bright building returns are {}"),
        "roads": ("the road network is {}",
                  "roads in the scene are {}",
                  "the transport lines are {}"),
        "water": ("the water body type is {}",
                  "dark water areas appear as {}",
                  "water in the scene is {}"),
    },
    "target": {
        "count": ("the number of targets is {} in total",
                  "there are {} targets in the image",
                  "counting the bright targets gives {} of them"),
        "location": ("the targets are located in the {} of the image",
                     "targets appear in the {} part",
                     "target positions cover the {} cells"),
        "feature": ("the targets show strong point scattering with cross sidelobes oriented {}",
                    "bright elongated returns are oriented {}",
                    "the main axes of the targets run {}"),
        "size": ("the largest target is about {} metres long",
                 "the longest target measures roughly {} metres",
                 "target length reaches about {} metres"),
        "category": ("the targets are identified as {}",
                     "the target category is {}",
                     "these targets are recognised as {}"),
        "distribution": ("the targets are {}",
                         "the target arrangement is {}",
                         "spatially the targets are {}"),
        "region": ("the scene lies near {}",
                   "geographically the image is close to {}",
                   "this acquisition covers an area near {}"),
        "environment": ("the targets are situated in {}",
                        "the surrounding environment is {}",
                        "the targets sit in {}"),
    },
}


@dataclasses.dataclass
class Knowledge:
  """A verbalised caption with its structure.

  `spans[i]` is the (start, end) character span of clause i's keyword in `caption`;
  `corrupted` lists the indices of clauses whose keyword is wrong and `true_keywords` their
  true values (same order).
  """

  scene_type: str
  field_names: tuple[str, ...]
  keywords: list[str]  # as written in the caption (possibly corrupted)
  caption: str
  spans: list[tuple[int, int]]
  corrupted: list[int]
  true_keywords: list[str]


def _region_name(mask: np.ndarray) -> str:
  """The 3x3 cell holding the centroid of `mask` (pixel centres, so flips map cells exactly)."""
  ys, xs = np.nonzero(mask)
  size = mask.shape[0]
  row, col = (min(int(3 * (v.mean() + 0.5) / size), 2) for v in (ys, xs))
  return CELL_NAMES[3 * row + col]


def _cover_fractions(landcover: np.ndarray) -> np.ndarray:
  return np.bincount(landcover.ravel(), minlength=len(terrain.LANDCOVER)) / landcover.size


def join_words(items: list[str]) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def landform_fields(chip: world.Chip) -> dict[str, str]:
  frac = _cover_fractions(chip.landcover)
  order = np.argsort(-frac, kind="stable")
  dominant, second = int(order[0]), int(order[1])
  if frac[second] >= 0.05:
    distribution = f"{COVER_NAMES[second]} mainly in the {_region_name(chip.landcover == second)}"
    boundary = f"{COVER_NAMES[dominant]} and {COVER_NAMES[second]}"
  else:
    distribution = f"uniform {COVER_NAMES[dominant]}"
    boundary = "no distinct regions"
  urban = frac[terrain.URBAN]
  buildings = _BUILDINGS[0] if urban >= 0.3 else _BUILDINGS[1] if urban >= 0.03 else _BUILDINGS[2]
  road = frac[terrain.ROAD]
  roads = _ROADS[0] if road >= 0.1 else _ROADS[1] if road >= 0.005 else _ROADS[2]
  water_kind = {"river": 1, "lake": 2, "coast": 3, "harbor": 3, "sea": 3}.get(chip.scene_kind, 4)
  water = _WATER[water_kind] if frac[terrain.WATER] >= 0.01 else _WATER[0]
  return {"terrain": _TERRAIN[chip.scene_kind], "functionality": _FUNCTION[dominant],
          "distribution": distribution, "layout": _LAYOUT[chip.scene_kind],
          "boundary": boundary, "buildings": buildings, "roads": roads, "water": water}


def _orientation(headings_deg: list[float]) -> str:
  """Axial mean of the headings (a ship heading 10 or 190 degrees lies north-south)."""
  doubled = np.deg2rad(2 * np.asarray(headings_deg))
  resultant = np.hypot(np.cos(doubled).mean(), np.sin(doubled).mean())
  if resultant < 0.7:
    return _ORIENTATION[4]
  axis = (np.rad2deg(np.arctan2(np.sin(doubled).mean(), np.cos(doubled).mean())) / 2) % 180
  return _ORIENTATION[[0, 2, 1, 3, 0][int((axis + 22.5) // 45)]]


def target_fields(chip: world.Chip) -> dict[str, str]:
  classes = [t.cls for t in chip.targets]
  main = targets.TARGET_CLASSES[int(np.bincount(classes).argmax())]
  cells = [CELL_NAMES[i] for i in np.flatnonzero(chip.grid.ravel())]
  if main.category == "aircraft":
    environment = _ENVIRONMENT[2]
  else:
    environment = {"harbor": _ENVIRONMENT[1], "sea": _ENVIRONMENT[0]}.get(chip.scene_kind, _ENVIRONMENT[3])
  return {"count": str(len(chip.targets)), "location": join_words(cells),
          "feature": _orientation([t.heading_deg for t in chip.targets]),
          "size": str(int(5 * round(max(t.length_m for t in chip.targets) / 5))),
          "category": main.plural, "distribution": _TARGET_DISTRIBUTION[chip.target_pattern],
          "region": f"{chip.geo['city']}, {chip.geo['country']}".lower(), "environment": environment}


def _random_value(field: str, scene_type: str, rng: np.random.Generator) -> str:
  """A random value of a field whose values are composed rather than drawn from a list."""
  if field == "location":
    cells = rng.choice(len(CELL_NAMES), rng.integers(1, 4), replace=False)
    return join_words([CELL_NAMES[i] for i in sorted(cells)])
  if field == "region":
    city = gazetteer.CITIES[rng.integers(len(gazetteer.CITIES))]
    return f"{city.name}, {city.country}".lower()
  if field == "boundary":
    a, b = rng.choice(len(COVER_NAMES), 2, replace=False)
    return f"{COVER_NAMES[a]} and {COVER_NAMES[b]}"
  if field == "distribution" and scene_type == "landform":
    return f"{COVER_NAMES[rng.integers(len(COVER_NAMES))]} mainly in the {CELL_NAMES[rng.integers(9)]}"
  vocabulary = _VOCABULARY[(scene_type, field)]
  return vocabulary[rng.integers(len(vocabulary))]


def _wrong_value(field: str, scene_type: str, true: str, rng: np.random.Generator) -> str:
  """A plausible but wrong keyword for `field`: a nearby number or another value.

  A count or size keyword need not be digits: real captions say "three" or "35.5", and a
  proofread keyword is whatever the decoder wrote; its first number is shifted, and one with no
  number gets a number of the world's range (a plain int() of it stopped the data pipeline).
  """
  if field in ("count", "size"):
    from klip_jax.data import fields  # fields imports this module

    number = fields.number_value(true)
    if number is None:
      if field == "count":
        return str(int(rng.integers(1, world.WorldConfig.max_targets + 1)))
      lengths = [length for c in targets.TARGET_CLASSES for length in c.length_m]
      return str(5 * int(rng.integers(round(min(lengths) / 5), round(max(lengths) / 5) + 1)))
    value = float(number)
    step = 1 if field == "count" else max(5, 5 * round(value * 0.4 / 5))
    options = [v for v in (value - 2 * step, value - step, value + step, value + 2 * step) if v >= 1]
    wrong = options[rng.integers(len(options))]
    return str(int(wrong)) if float(wrong).is_integer() else f"{wrong:g}"
  while _same_meaning(field, value := _random_value(field, scene_type, rng), true):
    pass
  return value


def _same_meaning(field: str, a: str, b: str) -> bool:
  """Whether two keywords of `field` say the same: a boundary between water and vegetation is one
  between vegetation and water, and cells are the same cells in any order, so such a draw is no
  corruption (it was recorded as one)."""
  if field in ("boundary", "location"):
    return set(_split_words(a)) == set(_split_words(b))
  return a == b


_VOCABULARY = {
    ("landform", "terrain"): tuple(_TERRAIN.values()),
    ("landform", "functionality"): tuple(_FUNCTION.values()),
    ("landform", "layout"): tuple(_LAYOUT.values()),
    ("landform", "buildings"): _BUILDINGS,
    ("landform", "roads"): _ROADS,
    ("landform", "water"): _WATER,
    ("target", "feature"): _ORIENTATION,
    ("target", "category"): tuple(c.plural for c in targets.TARGET_CLASSES),
    ("target", "distribution"): tuple(_TARGET_DISTRIBUTION.values()),
    ("target", "environment"): _ENVIRONMENT,
}


def landcover_prompts(cover: int) -> list[str]:
  """The functionality clause, in each of its templates, of a scene whose dominant land cover
  is `cover` (an index into terrain.LANDCOVER): zero-shot classification prompts."""
  return [template.format(_FUNCTION[cover]) for template in TEMPLATES["landform"]["functionality"]]


def verbalise(scene_type: str, keywords: list[str], template_choice) -> tuple[str, list[tuple[int, int]]]:
  """Fill the chosen templates and join the clauses; return the caption and keyword spans."""
  clauses, spans, offset = [], [], 0
  for name, keyword, choice in zip(FIELDS[scene_type], keywords, template_choice):
    prefix, suffix = TEMPLATES[scene_type][name][choice].split("{}")
    clauses.append(prefix + keyword + suffix)
    spans.append((offset + len(prefix), offset + len(prefix) + len(keyword)))
    offset += len(clauses[-1]) + len(SEPARATOR)
  return SEPARATOR.join(clauses), spans


def describe(chip: world.Chip, rng: np.random.Generator, noise_rate: float = 0.0) -> Knowledge:
  """The chip's HCoT fields, verbalised, with `noise_rate` of the clauses corrupted."""
  fields = target_fields(chip) if chip.scene_type == "target" else landform_fields(chip)
  names = FIELDS[chip.scene_type]
  keywords = [fields[n] for n in names]
  corrupted = [i for i in range(len(names)) if rng.uniform() < noise_rate]
  true_keywords = [keywords[i] for i in corrupted]
  for i in corrupted:
    keywords[i] = _wrong_value(names[i], chip.scene_type, keywords[i], rng)
  caption, spans = verbalise(chip.scene_type, keywords, rng.integers(0, 3, len(names)))
  return Knowledge(chip.scene_type, names, keywords, caption, spans, corrupted, true_keywords)


def clause_negative(scene_type: str, field_names, keywords, caption: str, spans,
                    rng: np.random.Generator) -> tuple[str, list[tuple[int, int]], int]:
  """The caption with ONE clause's keyword swapped for a plausible wrong value of its field
  (the same draw as caption noise): (caption, spans, changed clause). An ITM negative that
  differs from its positive by one clause teaches exactly what SCIO's screening asks of ITM,
  which whole-caption negatives never do."""
  k = int(rng.integers(len(keywords)))
  wrong = list(keywords)
  wrong[k] = _wrong_value(field_names[k], scene_type, keywords[k], rng)
  caption, spans = replace_keywords(caption, spans, wrong)
  return caption, spans, k


# ---------------------------------------------------------------------------------------------
# Geometric augmentation must keep the text true: a flip moves what the caption calls upper
# left, and turns a northeast-southwest axis into a northwest-southeast one.

_FLIP_CELL = {
    "vertical": {r * 3 + c: (2 - r) * 3 + c for r in range(3) for c in range(3)},
    "horizontal": {r * 3 + c: r * 3 + (2 - c) for r in range(3) for c in range(3)},
}


def _split_words(keyword: str) -> list[str]:
  head, _, last = keyword.rpartition(" and ")
  return (head.split(", ") if head else []) + [last]


def flip_keyword(scene_type: str, field: str, keyword: str, axis: str) -> str | None:
  """The keyword that describes the image flipped along `axis` ("vertical": rows reversed);
  None for a keyword of a field that names positions or directions (a target scene's location
  and orientation, a landform's distribution) in words other than the templates' (real
  captions' free text): nothing can say where it points after the flip."""
  cells = _FLIP_CELL[axis]
  if scene_type == "target" and field == "location":
    names = _split_words(keyword)
    if all(n in CELL_NAMES for n in names):
      return join_words(sorted((CELL_NAMES[cells[CELL_NAMES.index(n)]] for n in names),
                               key=CELL_NAMES.index))
    return None
  if scene_type == "target" and field == "feature":
    diagonal = {_ORIENTATION[2]: _ORIENTATION[3], _ORIENTATION[3]: _ORIENTATION[2]}
    return diagonal.get(keyword, keyword) if keyword in _ORIENTATION else None
  if scene_type == "landform" and field == "distribution":
    head, sep, cell = keyword.rpartition(" mainly in the ")
    if sep and cell in CELL_NAMES:
      return f"{head}{sep}{CELL_NAMES[cells[CELL_NAMES.index(cell)]]}"
    uniform = keyword.removeprefix("uniform ")
    return keyword if uniform != keyword and uniform in COVER_NAMES else None  # "uniform water": no place
  return keyword


def replace_keywords(caption: str, spans, new_keywords) -> tuple[str, list[tuple[int, int]]]:
  """Put `new_keywords` into the keyword spans of `caption`, shifting later spans."""
  pieces, new_spans, cursor, shift = [], [], 0, 0
  for (a, b), keyword in zip(spans, new_keywords):
    pieces += [caption[cursor:a], keyword]
    new_spans.append((a + shift, a + shift + len(keyword)))
    shift += len(keyword) - (b - a)
    cursor = b
  pieces.append(caption[cursor:])
  return "".join(pieces), new_spans
