"""Radar image formation for the synthetic SAR world: land cover and geometry to uint16 amplitude.

The images are physically motivated rather than noise: each land-cover class has a mean
backscatter with incidence-angle, band and polarisation dependence, hill slopes change the
local incidence angle, building walls facing the sensor give double-bounce lines and tall
objects cast radar shadow, ships and aircraft are strong point scatterers whose impulse
response has the sinc sidelobe cross, and the result is multiplied by L-look Gamma speckle and
quantised. The sensors that can be simulated (PLATFORMS) are here because band, polarisations
and resolution are what this model reads from them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from klip_jax.data.targets import TARGET_CLASSES, scatterer_offsets
from klip_jax.data.terrain import (
  BARE,
  LANDCOVER,
  ROAD,
  RUNWAY,
  URBAN,
  VEGETATION,
  WATER,
)


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
    for along, across, rel_db in scatterer_offsets(cls, t.length_m, t.width_m, rng):
      px = t.center_xy[0] + (along * np.sin(h) + across * np.cos(h)) / res
      py = t.center_xy[1] + (-along * np.cos(h) + across * np.sin(h)) / res
      power = 10 ** ((peak + rel_db) / 10) * np.clip(t.length_m / res / 10, 0.3, 1.0)
      intensity += power * np.outer(_psf_profile(py, size), _psf_profile(px, size))
  amplitude = np.sqrt(intensity) * _AMPLITUDE_SCALE
  return np.clip(np.rint(amplitude), 0, np.iinfo(np.uint16).max).astype(np.uint16)
