"""The embedded synthetic SAR world: scenes, targets, radar image formation and geo metadata.

klip_jax must run end to end without the (unreleased) FUSAR-GEOVL-1M data, so every chip is
synthesised here with exact ground truth. The images are physically motivated rather than
noise: a land-cover map from a terrain generator (rivers, coasts, hills, street grids,
harbours, airports) is turned into mean backscatter with incidence-angle, band and
polarisation dependence, hill slopes change the local incidence angle, building walls facing
the sensor give double-bounce lines and tall objects cast radar shadow, ships and aircraft are
strong point scatterers whose impulse response has the sinc sidelobe cross, and the result is
multiplied by L-look Gamma speckle and quantised to uint16 amplitude.

Conventions: the image is north-up, x (columns) points east and is also the ground-range
direction (the sensor looks from the west, x = 0 is near range); y (rows) points south.
Headings are degrees clockwise from north. One pixel is `resolution_m` metres on the ground.
Everything is a pure function of (seed, index): chips are generated independently and the same
seed gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools

import numpy as np
import pyproj

from klip_jax.data import gazetteer

LANDCOVER = ("water", "vegetation", "bare", "urban", "road", "runway")
WATER, VEGETATION, BARE, URBAN, ROAD, RUNWAY = range(len(LANDCOVER))

LANDFORM_KINDS = ("farmland", "river", "lake", "coast", "hills", "urban")
TARGET_KINDS = ("harbor", "sea", "airport")
SCENE_KINDS = LANDFORM_KINDS + TARGET_KINDS

# Scene kinds that need a terrain setting of the city; kinds not listed may occur anywhere.
_KIND_NEEDS = {"river": "river", "coast": "coastal", "harbor": "coastal", "sea": "coastal",
               "hills": "mountain"}


@dataclasses.dataclass(frozen=True)
class TargetClass:
  name: str
  plural: str
  category: str  # "ship" or "aircraft"
  length_m: tuple[float, float]
  width_ratio: float  # beam / length for ships, wing span / length for aircraft


TARGET_CLASSES = (
    TargetClass("fishing boat", "fishing boats", "ship", (12.0, 35.0), 0.22),
    TargetClass("cargo ship", "cargo ships", "ship", (90.0, 200.0), 0.15),
    TargetClass("tanker", "tankers", "ship", (210.0, 330.0), 0.17),
    TargetClass("fighter jet", "fighter jets", "aircraft", (14.0, 22.0), 0.7),
    TargetClass("transport aircraft", "transport aircraft", "aircraft", (24.0, 34.0), 1.3),
    TargetClass("airliner", "airliners", "aircraft", (36.0, 75.0), 0.95),
)
TARGET_PATTERNS = ("single", "row", "cluster", "scattered")


@dataclasses.dataclass(frozen=True)
class Platform:
  name: str
  band: str
  polarizations: tuple[str, ...]
  resolution_m: tuple[float, float]


PLATFORMS = (
    Platform("Gaofen-3", "C", ("HH", "HV", "VV", "VH"), (1.0, 10.0)),
    Platform("Sentinel-1", "C", ("VV", "VH"), (5.0, 10.0)),
    Platform("TerraSAR-X", "X", ("HH", "VV"), (1.0, 3.0)),
    Platform("Qilu-1", "X", ("VV",), (1.0, 5.0)),
    Platform("ALOS-2", "L", ("HH", "HV"), (3.0, 10.0)),
)

# Mean backscatter sigma0 in dB at 20 degrees incidence and its slope in dB per degree, for a
# like-polarised C-band sensor. Smooth surfaces (water, tarmac) fall off steeply with
# incidence; vegetation is a volume scatterer and nearly flat.
_SIGMA0_DB = {WATER: (-12.0, -0.50), VEGETATION: (-8.0, -0.08), BARE: (-11.0, -0.15),
              URBAN: (-6.0, -0.05), ROAD: (-19.0, -0.30), RUNWAY: (-21.0, -0.30)}
# Band offsets (dB): X sees the canopy top (brighter), L penetrates it and sees smoother water.
_BAND_DB = {"X": {VEGETATION: 0.8, BARE: 0.5, WATER: 0.5},
            "C": {},
            "L": {VEGETATION: -2.5, BARE: -3.0, WATER: -4.0, ROAD: -2.0, RUNWAY: -2.0}}
# Cross-polarisation loss (dB): volume scattering keeps the most cross-polarised power.
_CROSS_POL_DB = {WATER: -10.0, VEGETATION: -6.0, BARE: -9.0, URBAN: -7.0, ROAD: -10.0,
                 RUNWAY: -10.0}
_ROOF_DB = -4.0         # rough roofs
_DOUBLE_BOUNCE_DB = 9.0  # wall-ground dihedral facing the sensor
_HULL_DB = 3.0           # metal hulls and airframes, before their point scatterers
_POINT_PEAK_DB = 20.0    # strongest point scatterer of a 50 m target, as a pixel sigma0
_PSF_HALF_WIDTH = 24     # pixels of sidelobe cross kept each side of a point scatterer
_AMPLITUDE_SCALE = 3000.0  # uint16 digital number of a 0 dB pixel amplitude


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
class Target:
  cls: int  # index into TARGET_CLASSES
  center_xy: tuple[float, float]  # pixels
  length_m: float
  width_m: float
  heading_deg: float
  box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, exclusive upper bounds


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


# ---------------------------------------------------------------------------------------------
# Random fields and geometry helpers.


def smooth_field(rng: np.random.Generator, size: int, scale_px: float) -> np.ndarray:
  """Zero-mean, unit-std Gaussian random field with correlation length `scale_px` (FFT)."""
  noise = rng.standard_normal((size, size))
  f = np.fft.fftfreq(size)
  sigma_f = 1.0 / (2 * np.pi * max(scale_px, 0.5))
  transfer = np.exp(-0.5 * (f[:, None] ** 2 + f[None, :] ** 2) / sigma_f**2)
  field = np.fft.ifft2(np.fft.fft2(noise) * transfer).real
  field -= field.mean()
  return field / (field.std() + 1e-12)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  return xx + 0.5, yy + 0.5


def _rotated(size: int, angle_rad: float, origin: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
  """Pixel coordinates in a frame rotated by `angle_rad` about `origin`: (along, across)."""
  xx, yy = _grid(size)
  dx, dy = xx - origin[0], yy - origin[1]
  c, s = np.cos(angle_rad), np.sin(angle_rad)
  return dx * c + dy * s, -dx * s + dy * c


def _parcels(rng: np.random.Generator, size: int, spacing_px: float) -> np.ndarray:
  """Voronoi field parcels: an integer id per pixel."""
  n = int(np.clip((size / spacing_px) ** 2 * 1.3, 2, 200))
  seeds = rng.uniform(0, size, (n, 2))
  xx, yy = _grid(size)
  d2 = (xx[..., None] - seeds[:, 0]) ** 2 + (yy[..., None] - seeds[:, 1]) ** 2
  return d2.argmin(-1)


def _draw_roads(rng: np.random.Generator, lc: np.ndarray, res: float, count: int) -> None:
  size = lc.shape[0]
  for _ in range(count):
    along, across = _rotated(size, rng.uniform(0, np.pi), tuple(rng.uniform(0, size, 2)))
    width_px = max(rng.uniform(6, 14) / res, 1.0)
    lc[np.abs(across) < width_px / 2] = ROAD


# ---------------------------------------------------------------------------------------------
# Terrain generators: each returns (landcover, elevation_m, building_height_m).


def _farmland(rng, size, res, arid):
  parcels = _parcels(rng, size, rng.uniform(120, 400) / res)
  bare_share = 0.5 if arid else 0.2
  lc = np.where(rng.uniform(size=parcels.max() + 1)[parcels] < bare_share, BARE, VEGETATION)
  lc = lc.astype(np.uint8)
  _draw_roads(rng, lc, res, rng.integers(0, 3))
  return lc, None, None


def _river(rng, size, res, arid):
  lc, _, _ = _farmland(rng, size, res, arid)
  along, across = _rotated(size, rng.uniform(0, np.pi), (size / 2, size / 2))
  wavelength = rng.uniform(400, 2000) / res
  meander = rng.uniform(0.05, 0.25) * wavelength * np.sin(2 * np.pi * along / wavelength + rng.uniform(0, 6.3))
  width = max(rng.uniform(25, 250) / res, 2.0)
  offset = rng.uniform(-0.2, 0.2) * size
  lc[np.abs(across - meander - offset) < width / 2] = WATER
  return lc, None, None


def _lake(rng, size, res, arid):
  lc, _, _ = _farmland(rng, size, res, arid)
  xx, yy = _grid(size)
  cx, cy = rng.uniform(0.3, 0.7, 2) * size
  radius = rng.uniform(0.15, 0.35) * size
  wobble = 1 + 0.25 * smooth_field(rng, size, size / 6)
  lc[np.hypot(xx - cx, (yy - cy) * rng.uniform(0.6, 1.4)) < radius * wobble] = WATER
  return lc, None, None


def _coastline(rng, size, res, water_share):
  """Land (vegetation with bare patches and a beach) on one side of a rough shoreline."""
  along, across = _rotated(size, rng.uniform(0, 2 * np.pi), (size / 2, size / 2))
  shore = across - (water_share - 0.5) * size + 0.12 * size * smooth_field(rng, size, size / 5)
  lc = np.where(smooth_field(rng, size, max(150 / res, 2)) > 0.8, BARE, VEGETATION).astype(np.uint8)
  lc[(shore > 0) & (shore < max(30 / res, 1))] = BARE  # beach
  lc[shore <= 0] = WATER
  return lc, shore


def _coast(rng, size, res, arid):
  lc, _ = _coastline(rng, size, res, rng.uniform(0.3, 0.7))
  return lc, None, None


def _hills(rng, size, res, arid):
  relief = rng.uniform(80, 600)
  scale = rng.uniform(250, 900) / res
  z = relief * (0.5 + 0.5 * np.tanh(smooth_field(rng, size, scale)))
  lc = np.full((size, size), VEGETATION, np.uint8)
  slope = np.hypot(*np.gradient(z, res))
  lc[(z > np.quantile(z, 0.55 if arid else 0.7)) | (slope > 0.6)] = BARE
  if rng.uniform() < 0.4:
    lc[z < np.quantile(z, 0.05)] = WATER  # a valley reservoir
  return lc, z, None


def _buildings(rng, lc, heights, block_mask, res, min_h, max_h):
  """Fill a block with rectangular buildings separated by courtyards."""
  ys, xs = np.nonzero(block_mask)
  if len(ys) == 0:
    return
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  step = max(rng.uniform(20, 45) / res, 2)
  gap = max(rng.uniform(4, 10) / res, 1)
  for by in np.arange(y0, y1, step):
    for bx in np.arange(x0, x1, step):
      sl = (slice(int(by), int(min(by + step - gap, y1))), slice(int(bx), int(min(bx + step - gap, x1))))
      if block_mask[sl].size and block_mask[sl].all():
        heights[sl] = rng.uniform(min_h, max_h)
  lc[block_mask] = URBAN


def _urban(rng, size, res, arid):
  lc = np.full((size, size), VEGETATION, np.uint8)
  heights = np.zeros((size, size))
  angle = rng.uniform(0, np.pi / 2) if rng.uniform() < 0.5 else 0.0
  along, across = _rotated(size, angle, (0.0, 0.0))
  block = rng.uniform(70, 160) / res
  street = max(rng.uniform(10, 24) / res, 1.0)
  ia, ib = np.floor(along / block), np.floor(across / block)
  on_street = ((along % block) < street) | ((across % block) < street)
  block_id = (ia * 1000 + ib).astype(np.int64)
  max_h = rng.uniform(12, 80)
  for bid in np.unique(block_id[~on_street]):
    mask = (block_id == bid) & ~on_street
    if rng.uniform() < 0.12:
      continue  # a park
    _buildings(rng, lc, heights, mask, res, 6, max_h)
  lc[on_street] = ROAD
  return lc, None, heights


def _harbor(rng, size, res, arid):
  lc, shore = _coastline(rng, size, res, rng.uniform(0.5, 0.7))
  heights = np.zeros((size, size))
  land_urban = (shore > max(30 / res, 1)) & (smooth_field(rng, size, size / 4) > -0.3)
  _buildings(rng, lc, heights, land_urban, res, 6, 30)
  lc[land_urban & (heights == 0)] = URBAN
  # Piers: thin concrete strips reaching from the shore into the water.
  along, across = _rotated(size, 0.0, (0.0, 0.0))
  for _ in range(rng.integers(1, 4)):
    center = rng.uniform(0.1, 0.9) * size
    width = max(rng.uniform(10, 25) / res, 1.0)
    length = rng.uniform(60, 250) / res
    pier = (np.abs(along - center) < width / 2) & (shore > -length) & (shore <= 0)
    if rng.uniform() < 0.5:
      pier = (np.abs(across - center) < width / 2) & (shore > -length) & (shore <= 0)
    lc[pier] = BARE
  return lc, None, heights


def _sea(rng, size, res, arid):
  if rng.uniform() < 0.5:
    return np.full((size, size), WATER, np.uint8), None, None
  lc, _ = _coastline(rng, size, res, rng.uniform(0.8, 0.95))
  return lc, None, None


def _airport(rng, size, res, arid):
  lc = np.full((size, size), BARE if arid else VEGETATION, np.uint8)
  heights = np.zeros((size, size))
  along, across = _rotated(size, rng.choice([0.0, np.pi / 2, rng.uniform(0, np.pi)]), (size / 2, size / 2))
  # Apron on one side (takes most of the chip), runway strip and grass on the other.
  apron_edge = rng.uniform(0.15, 0.3) * size
  lc[across < apron_edge] = RUNWAY
  runway_w = max(rng.uniform(45, 60) / res, 2.0)
  runway_c = apron_edge + max(rng.uniform(60, 150) / res, runway_w)
  lc[np.abs(across - runway_c) < runway_w / 2] = RUNWAY
  terminal = across < -0.45 * size
  _buildings(rng, lc, heights, terminal, res, 10, 25)
  return lc, None, heights


_GENERATORS = {"farmland": _farmland, "river": _river, "lake": _lake, "coast": _coast,
               "hills": _hills, "urban": _urban, "harbor": _harbor, "sea": _sea,
               "airport": _airport}


# ---------------------------------------------------------------------------------------------
# Targets.


def _target_footprint(cls: TargetClass, length_px: float, width_px: float, heading_rad: float,
                      dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
  """Which pixels (given by offsets from the target centre) the target covers."""
  along = dx * np.sin(heading_rad) - dy * np.cos(heading_rad)
  across = dx * np.cos(heading_rad) + dy * np.sin(heading_rad)
  half = length_px / 2
  if cls.category == "ship":
    # A hull of constant beam that tapers to the bow over its front fifth.
    taper = np.clip((half - along) / (0.2 * length_px), 0, 1)
    return (np.abs(along) <= half) & (np.abs(across) <= np.maximum(width_px / 2 * taper, 0.5))
  fuselage = (np.abs(along) <= half) & (np.abs(across) <= max(length_px / 20, 0.5))
  wing = (np.abs(along - 0.05 * length_px) <= max(length_px / 10, 0.5)) & (np.abs(across) <= width_px / 2)
  tail = (np.abs(along + 0.42 * length_px) <= max(length_px / 20, 0.5)) & (np.abs(across) <= width_px / 6)
  return fuselage | wing | tail


def _scatterer_offsets(cls: TargetClass, length_m: float, width_m: float, rng) -> list[tuple[float, float, float]]:
  """(along_m, across_m, relative_dB) of a target's dominant point scatterers."""
  half = length_m / 2
  if cls.category == "ship":
    points = [(0.45 * half, 0.0, 0.0), (-0.9 * half, 0.0, -3.0)]  # superstructure, stern
    points += [(rng.uniform(-0.7, 0.8) * half, 0.0, rng.uniform(-8, -3)) for _ in range(rng.integers(1, 4))]
    return points
  return [(half, 0.0, -4.0), (-0.9 * half, 0.0, -2.0),            # nose, tail fin
          (0.05 * length_m, 0.25 * width_m, -1.0), (0.05 * length_m, -0.25 * width_m, -1.0),  # engines
          (0.0, 0.0, 0.0)]                                        # wing root


def _pattern_centers(rng, pattern: str, n: int, size: int, spacing_px: float) -> np.ndarray:
  if pattern == "row":
    start = rng.uniform(0.15, 0.85, 2) * size
    direction = rng.uniform(0, 2 * np.pi)
    step = spacing_px * np.array([np.cos(direction), np.sin(direction)])
    return start + (np.arange(n * 4)[:, None] - n / 2) * step
  if pattern == "cluster":
    center = rng.uniform(0.25, 0.75, 2) * size
    return center + rng.normal(0, 1.2 * spacing_px + 0.04 * size, (n * 20, 2))
  return rng.uniform(0, size, (n * 20, 2))


def _place_targets(rng, lc: np.ndarray, res: float, category: str, max_targets: int):
  """Place ships on water or aircraft on aprons, without overlaps and inside the chip."""
  size = lc.shape[0]
  allowed = lc == (WATER if category == "ship" else RUNWAY)
  choices = [i for i, c in enumerate(TARGET_CLASSES) if c.category == category
             and c.length_m[1] / res <= 0.6 * size and c.length_m[0] / res >= 3]
  if not choices or allowed.mean() < 0.05:
    return [], "single", np.zeros((size, size), bool)
  main = int(rng.choice(choices))
  n = int(rng.integers(1, max_targets + 1))
  pattern = "single" if n == 1 else str(rng.choice(TARGET_PATTERNS[1:]))
  heading = rng.uniform(0, 360)
  spacing = 1.3 * TARGET_CLASSES[main].length_m[1] / res
  occupied = np.zeros((size, size), bool)
  targets = []
  for cx, cy in _pattern_centers(rng, pattern, n, size, spacing):
    if len(targets) == n:
      break
    cls_idx = main if rng.uniform() < 0.85 else int(rng.choice(choices))
    cls = TARGET_CLASSES[cls_idx]
    length_m = rng.uniform(*cls.length_m)
    width_m = length_m * cls.width_ratio
    h = heading if pattern == "row" else (heading + rng.normal(0, 20)) % 360 if pattern == "cluster" else rng.uniform(0, 360)
    length_px, width_px = length_m / res, width_m / res
    r = int(np.ceil(max(length_px, width_px) / 2)) + 2
    x0, y0 = int(np.floor(cx)) - r, int(np.floor(cy)) - r
    if x0 < 1 or y0 < 1 or x0 + 2 * r + 1 > size - 1 or y0 + 2 * r + 1 > size - 1:
      continue
    yy, xx = np.mgrid[y0:y0 + 2 * r + 1, x0:x0 + 2 * r + 1]
    foot = _target_footprint(cls, length_px, width_px, np.deg2rad(h), xx + 0.5 - cx, yy + 0.5 - cy)
    if not foot.any():
      continue
    window = (slice(y0, y0 + 2 * r + 1), slice(x0, x0 + 2 * r + 1))
    if allowed[window][foot].mean() < 0.95 or occupied[window][foot].any():
      continue
    occupied[window] |= foot
    fy, fx = np.nonzero(foot)
    box = (int(x0 + fx.min()), int(y0 + fy.min()), int(x0 + fx.max() + 1), int(y0 + fy.max() + 1))
    targets.append(Target(cls_idx, (float(cx), float(cy)), float(length_m), float(width_m), float(h), box))
  if len(targets) == 1:
    pattern = "single"
  return targets, pattern, occupied


# ---------------------------------------------------------------------------------------------
# Radar image formation.


def sigma0_db(lc: np.ndarray, incidence_deg, band: str, polarization: str) -> np.ndarray:
  """Mean backscatter (dB) of each land-cover class at the given (local) incidence angle."""
  base = np.array([_SIGMA0_DB[c][0] for c in range(len(LANDCOVER))])
  slope = np.array([_SIGMA0_DB[c][1] for c in range(len(LANDCOVER))])
  offset = np.array([_BAND_DB[band].get(c, 0.0) for c in range(len(LANDCOVER))])
  if polarization[0] != polarization[1]:
    offset = offset + np.array([_CROSS_POL_DB[c] for c in range(len(LANDCOVER))])
  elif polarization == "HH":
    offset = offset + np.where(np.arange(len(LANDCOVER)) == WATER, -2.0, 0.0)
  return base[lc] + slope[lc] * (np.asarray(incidence_deg) - 20.0) + offset[lc]


def radar_shadow(height_m: np.ndarray, res: float, incidence_deg: float) -> np.ndarray:
  """Pixels hidden from a sensor looking from the west (x = 0) by terrain or buildings.

  A ray at incidence theta drops res / tan(theta) metres per pixel towards far range; the
  grazing ray leaves an occluding pixel x' at its far edge (x' + 1/2), so the centre of pixel x
  is shadowed when z(x') - (x - x' - 1/2) res / tan(theta) > z(x) for some x' < x.
  """
  drop = res / np.tan(np.deg2rad(incidence_deg))
  g = height_m + drop * np.arange(height_m.shape[1])[None, :]
  previous_max = np.maximum.accumulate(np.concatenate([np.full((g.shape[0], 1), -np.inf), g[:, :-1]], 1), axis=1)
  return previous_max + drop / 2 > g + 1e-6


def _psf_profile(center: float, size: int) -> np.ndarray:
  """1-D intensity impulse response: sinc^2, whose -13 dB sidelobes form the SAR cross."""
  offset = np.arange(size) + 0.5 - center
  return np.where(np.abs(offset) <= _PSF_HALF_WIDTH, np.sinc(offset) ** 2, 0.0)


def form_image(rng, lc, elevation, heights, targets, occupied, res, incidence, band, pol, looks,
               nesz_db) -> np.ndarray:
  """Land cover + geometry -> speckled, quantised uint16 amplitude."""
  size = lc.shape[0]
  if elevation is not None:
    slope_x = np.gradient(elevation, res, axis=1)  # > 0: rising away from the sensor (facing it)
    local = np.clip(incidence - np.rad2deg(np.arctan(slope_x)), 2.0, 89.0)
    area = np.sin(np.deg2rad(incidence)) / np.sin(np.deg2rad(local))
    intensity = 10 ** (sigma0_db(lc, local, band, pol) / 10) * area
  else:
    intensity = 10 ** (sigma0_db(lc, incidence, band, pol) / 10)
  height = np.zeros((size, size)) if elevation is None else elevation.copy()
  if heights is not None:
    roofs = heights > 0
    intensity[roofs] = 10 ** (_ROOF_DB / 10)
    # Double bounce at the first ground pixel in front of a wall facing the sensor.
    wall = np.zeros_like(roofs)
    wall[:, :-1] = ~roofs[:, :-1] & roofs[:, 1:]
    boost = 10 ** (_DOUBLE_BOUNCE_DB / 10) * np.clip(np.roll(heights, -1, axis=1) / 20.0, 0.5, 3.0)
    intensity[wall] = boost[wall]
    height = height + heights
  if occupied.any():
    intensity[occupied] = 10 ** (_HULL_DB / 10)
  intensity[radar_shadow(height, res, incidence)] = 0.0
  intensity = (intensity + 10 ** (nesz_db / 10)) * rng.gamma(looks, 1.0 / looks, (size, size))
  for t in targets:
    cls = TARGET_CLASSES[t.cls]
    peak = _POINT_PEAK_DB + 10 * np.log10(t.length_m / 50.0)
    h = np.deg2rad(t.heading_deg)
    for along, across, rel_db in _scatterer_offsets(cls, t.length_m, t.width_m, rng):
      px = t.center_xy[0] + (along * np.sin(h) + across * np.cos(h)) / res
      py = t.center_xy[1] + (-along * np.cos(h) + across * np.sin(h)) / res
      power = 10 ** ((peak + rel_db) / 10) * np.clip(t.length_m / res / 10, 0.3, 1.0)
      intensity += power * np.outer(_psf_profile(py, size), _psf_profile(px, size))
  amplitude = np.sqrt(intensity) * _AMPLITUDE_SCALE
  return np.clip(np.rint(amplitude), 0, np.iinfo(np.uint16).max).astype(np.uint16)


# ---------------------------------------------------------------------------------------------
# Geo metadata.


@functools.lru_cache(maxsize=128)
def _to_utm(epsg: int) -> pyproj.Transformer:
  return pyproj.Transformer.from_crs(4326, epsg, always_xy=True)


def utm_epsg(lon: float, lat: float) -> int:
  zone = int((lon + 180) // 6) % 60 + 1
  return (32600 if lat >= 0 else 32700) + zone


def _geo(rng, city: gazetteer.City, platform: Platform, res: float, size: int, looks: int) -> dict:
  lon = float(np.clip(city.lon + rng.uniform(-0.15, 0.15), -180, 180))
  lat = float(np.clip(city.lat + rng.uniform(-0.12, 0.12), -89.9, 89.9))
  epsg = utm_epsg(lon, lat)
  easting, northing = _to_utm(epsg).transform(lon, lat)
  half = size * res / 2
  day = datetime.date(2016, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 3652)))
  return {
      "lon": lon, "lat": lat, "epsg": epsg,
      "geotransform": np.array([easting - half, res, 0.0, northing + half, 0.0, -res]),
      "city": city.name, "country": city.country,
      "platform": platform.name, "band": platform.band,
      "polarization": str(rng.choice(platform.polarizations)),
      "resolution_m": res, "incidence_deg": float(np.round(rng.uniform(20, 50), 2)),
      "looks": looks, "acquired": day.isoformat(),
  }


# ---------------------------------------------------------------------------------------------
# The world.


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
  geo = _geo(rng, city, platform, res, size, config.looks)
  lc, elevation, heights = _GENERATORS[kind](rng, size, res, city.climate == "arid")
  targets, pattern, occupied = [], "", np.zeros((size, size), bool)
  if kind in TARGET_KINDS:
    category = "aircraft" if kind == "airport" else "ship"
    targets, pattern, occupied = _place_targets(rng, lc, res, category, config.max_targets)
  scene_type = "target" if targets else "landform"
  image = form_image(rng, lc, elevation, heights, targets, occupied, res, geo["incidence_deg"],
                     geo["band"], geo["polarization"], config.looks, config.nesz_db)
  return Chip(id=f"{split}-{seed}-{index:08d}", image=image, geo=geo, scene_type=scene_type,
              scene_kind=kind, landcover=lc.astype(np.uint8), targets=targets,
              target_pattern=pattern)
