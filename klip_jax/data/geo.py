"""Geo metadata of a synthetic SAR chip: where, when and by which sensor it was acquired.

Chips are placed near real gazetteer cities and geo-referenced in the local UTM zone (EPSG
326xx/327xx) with a GDAL-style geotransform, so the text side (city, country, platform, date)
and the records' geo fields describe a consistent, plausible acquisition.
"""

from __future__ import annotations

import datetime
import functools

import numpy as np
import pyproj

from klip_jax.data import gazetteer
from klip_jax.data.radar import Platform


@functools.lru_cache(maxsize=128)
def _to_utm(epsg: int) -> pyproj.Transformer:
  return pyproj.Transformer.from_crs(4326, epsg, always_xy=True)


def utm_epsg(lon: float, lat: float) -> int:
  zone = int((lon + 180) // 6) % 60 + 1
  return (32600 if lat >= 0 else 32700) + zone


def geo_metadata(rng, city: gazetteer.City, platform: Platform, res: float, size: int, looks: int) -> dict:
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
