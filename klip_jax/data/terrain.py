"""Terrain of the synthetic SAR world: land-cover classes and the scene generators that draw them.

A generator turns a scene kind (farmland, river, lake, coast, hills, urban, harbor, sea,
airport) into a land-cover map plus the geometry that radar image formation needs: terrain
elevation for hill slopes and building heights for double bounce and shadow. Keeping them
apart from the radar model means a new landscape only has to produce those three arrays.
"""

from __future__ import annotations

import functools

import numpy as np

LANDCOVER = ("water", "vegetation", "bare", "urban", "road", "runway")
WATER, VEGETATION, BARE, URBAN, ROAD, RUNWAY = range(len(LANDCOVER))


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


def gaussian_surface(rng: np.random.Generator, size: int, scale_px: float, waves: int = 256) -> np.ndarray:
  """Unit-variance Gaussian random field with smooth_field's covariance, exp(-r^2 / (4 scale^2)),
  whatever the chip size: a sum of `waves` cosines with random directions and wavenumbers
  (random Fourier features) evaluated on the pixel grid.

  For a feature longer than the chip (a hillside seen by a 32 px chip): smooth_field's periodic
  FFT grid has no wavelength longer than the chip and normalises each chip to unit std, so such a
  field came out flat (every wavelength filtered out) or as one full sine cycle stretched to the
  whole relief; here the chip shows the part of the larger surface it covers, with the slope a
  surface of that correlation length has.
  """
  k = rng.normal(0.0, 1.0 / (np.sqrt(2.0) * max(scale_px, 0.5)), (waves, 2))  # radians per pixel
  phase = rng.uniform(0, 2 * np.pi, waves)
  centres = np.arange(size) + 0.5
  ax, ay = centres[:, None] * k[:, 0] + phase, centres[:, None] * k[:, 1]  # [size, waves]
  # cos(ax + ay) = cos ax cos ay - sin ax sin ay: two matrix products instead of size^2 x waves cosines.
  return np.sqrt(2.0 / waves) * (np.cos(ay) @ np.cos(ax).T - np.sin(ay) @ np.sin(ax).T)


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
    _, across = _rotated(size, rng.uniform(0, np.pi), tuple(rng.uniform(0, size, 2)))
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
  _, across = _rotated(size, rng.uniform(0, 2 * np.pi), (size / 2, size / 2))
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
  z = relief * (0.5 + 0.5 * np.tanh(gaussian_surface(rng, size, scale)))  # hills outgrow most chips
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
  _, across = _rotated(size, rng.choice([0.0, np.pi / 2, rng.uniform(0, np.pi)]), (size / 2, size / 2))
  # Apron on one side (takes most of the chip), runway strip and grass on the other.
  apron_edge = rng.uniform(0.15, 0.3) * size
  lc[across < apron_edge] = RUNWAY
  runway_w = max(rng.uniform(45, 60) / res, 2.0)
  runway_c = apron_edge + max(rng.uniform(60, 150) / res, runway_w)
  lc[np.abs(across - runway_c) < runway_w / 2] = RUNWAY
  terminal = across < -0.45 * size
  _buildings(rng, lc, heights, terminal, res, 10, 25)
  return lc, None, heights


GENERATORS = {"farmland": _farmland, "river": _river, "lake": _lake, "coast": _coast,
               "hills": _hills, "urban": _urban, "harbor": _harbor, "sea": _sea,
               "airport": _airport}
