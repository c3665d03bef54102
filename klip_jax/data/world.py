"""The embedded synthetic SAR world: scene-level API, one chip with exact ground truth per call.

klip_jax must run end to end without the (unreleased) FUSAR-GEOVL-1M data, so every chip is
synthesised here. make_chip picks a city, a scene kind and a sensor, then composes the parts:
terrain.py draws land cover, elevation and buildings, targets.py places ships and aircraft,
radar.py turns them into a speckled uint16 amplitude image, and geo.py adds the acquisition
metadata.

Conventions: the image is north-up, x (columns) points east and is also the ground-range
direction (the sensor looks from the west, x = 0 is near range); y (rows) points south.
Headings are degrees clockwise from north. One pixel is `resolution_m` metres on the ground.
Everything is a pure function of (seed, index): chips are generated independently and the same
seed gives the same bytes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from klip_jax.data import gazetteer
from klip_jax.data.geo import geo_metadata
from klip_jax.data.radar import PLATFORMS, form_image
from klip_jax.data.targets import TARGET_CLASSES, Target, place_targets
from klip_jax.data.terrain import GENERATORS, LANDCOVER

LANDFORM_KINDS = ("farmland", "river", "lake", "coast", "hills", "urban")
TARGET_KINDS = ("harbor", "sea", "airport")
SCENE_KINDS = LANDFORM_KINDS + TARGET_KINDS

# Scene kinds that need a terrain setting of the city; kinds not listed may occur anywhere.
_KIND_NEEDS = {"river": "river", "coast": "coastal", "harbor": "coastal", "sea": "coastal",
               "hills": "mountain"}


# The generator's version, recorded with every synthetic dataset (builder.SynthSettings): the
# same settings make other bytes under another version, so a dataset of an older one is not
# reused as if it were this one's. Raise it with any change to what a seed generates.
# 2: hills with relief at any chip size (terrain.gaussian_surface), no corruption that only
# reorders a boundary's or location's words.
GENERATOR_VERSION = 2


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """What the world generates. Defaults give 128 px chips at 1-10 m."""

  image_size: int = 128
  resolution_m: tuple[float, float] = (1.0, 10.0)
  looks: int = 4
  target_fraction: float = 0.5  # share of target scenes (ships, aircraft)
  max_targets: int = 8
  nesz_db: float = -28.0  # noise-equivalent sigma zero: the floor of shadows

  def validate(self) -> None:
    from klip_jax.errors import ConfigError  # local: errors is tiny and imports nothing
    lo, hi = self.resolution_m
    if not 16 <= self.image_size <= 4096:
      raise ConfigError(f"world.image_size={self.image_size}: use 16..4096 pixels.")
    if not 0.25 <= lo <= hi <= 30:
      raise ConfigError(f"world.resolution_m={self.resolution_m}: need 0.25 <= min <= max <= 30.")
    if self.looks < 1:
      raise ConfigError(f"world.looks={self.looks}: the number of looks must be >= 1.")
    if not 0 <= self.target_fraction <= 1:
      raise ConfigError(f"world.target_fraction={self.target_fraction}: use a value in [0, 1].")
    if self.max_targets < 1:
      raise ConfigError(f"world.max_targets={self.max_targets}: must be >= 1.")


@dataclasses.dataclass
class Chip:
  """One synthetic SAR chip with its metadata and exact ground truth."""

  id: str
  image: np.ndarray  # uint16 amplitude, H x W
  geo: dict
  scene_type: str  # "landform" or "target"
  scene_kind: str
  landcover: np.ndarray  # uint8, H x W, values index LANDCOVER
  targets: list[Target]
  target_pattern: str  # one of TARGET_PATTERNS, "" for landform scenes

  @property
  def counts(self) -> np.ndarray:
    return np.bincount([t.cls for t in self.targets], minlength=len(TARGET_CLASSES)).astype(np.int32)

  @property
  def dominant(self) -> int:
    return int(np.bincount(self.landcover.ravel(), minlength=len(LANDCOVER)).argmax())

  @property
  def grid(self) -> np.ndarray:
    """3x3 occupancy: which cells (row-major, top-left first) hold a target centre."""
    occ = np.zeros((3, 3), np.uint8)
    size = self.image.shape[0]
    for t in self.targets:
      cx, cy = t.center_xy
      occ[min(int(3 * cy / size), 2), min(int(3 * cx / size), 2)] = 1
    return occ


def _choose_kind(rng, city: gazetteer.City, target_fraction: float) -> str:
  kinds = TARGET_KINDS if rng.uniform() < target_fraction else LANDFORM_KINDS
  allowed = [k for k in kinds if _KIND_NEEDS.get(k) in (None, *city.terrain)]
  return str(rng.choice(allowed))


def make_chip(seed: int, index: int, config: WorldConfig = WorldConfig(), split: str = "train") -> Chip:
  """Chip `index` of the world `seed`: a pure function of its arguments."""
  rng = np.random.default_rng([seed, index, sum(map(ord, split))])
  size = config.image_size
  city = gazetteer.CITIES[rng.integers(len(gazetteer.CITIES))]
  kind = _choose_kind(rng, city, config.target_fraction)
  lo, hi = config.resolution_m
  platforms = [p for p in PLATFORMS if p.resolution_m[0] <= hi and p.resolution_m[1] >= lo]
  platform = platforms[rng.integers(len(platforms))]
  res = float(np.round(rng.uniform(max(lo, platform.resolution_m[0]), min(hi, platform.resolution_m[1])), 2))
  geo = geo_metadata(rng, city, platform, res, size, config.looks)
  lc, elevation, heights = GENERATORS[kind](rng, size, res, city.climate == "arid")
  targets, pattern, occupied = [], "", np.zeros((size, size), bool)
  if kind in TARGET_KINDS:
    category = "aircraft" if kind == "airport" else "ship"
    targets, pattern, occupied = place_targets(rng, lc, res, category, config.max_targets)
  scene_type = "target" if targets else "landform"
  # A target kind where no target fitted is a landform scene: no pattern (place_targets names the
  # one it drew even when nothing was placed).
  pattern = pattern if targets else ""
  image = form_image(rng, lc, elevation, heights, targets, occupied, res, geo["incidence_deg"],
                     geo["band"], geo["polarization"], config.looks, config.nesz_db)
  return Chip(id=f"{split}-{seed}-{index:08d}", image=image, geo=geo, scene_type=scene_type,
              scene_kind=kind, landcover=lc.astype(np.uint8), targets=targets,
              target_pattern=pattern)
