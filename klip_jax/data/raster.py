"""SAR rasters as users hold them -> one band of amplitude for the model.

Value types (`"value"` in a manifest line, or detected):

    amplitude   |s|: digital numbers (uint8/16) or calibrated float amplitude
    intensity   |s|^2: sigma0 / beta0 / gamma0 power, linear; amplitude = sqrt (negative
                values, left by thermal-noise subtraction, count as 0)
    db          10 log10(intensity) = 20 log10(amplitude); amplitude = 10^(dB / 20)
    complex     SLC samples z (complex dtype, or an I and a Q band: `"band": [1, 2]`); |z|

Detection when no value is declared (`detect_value`): a complex dtype is complex; integers are
amplitude; floats with any negative valid pixel are dB; other floats are amplitude. Linear
intensity cannot be told from amplitude by its numbers: declare it.

Invalid pixels are the file's nodata value and masks (`read_masks`: nodata, internal masks,
alpha), a `"nodata"` value given in the manifest line, and NaN/inf. They become NaN in the
amplitude and count in no statistic. Integer amplitude without invalid pixels stays uint16
(lossless PNG in the record, the synthetic world's path); everything else is float32 amplitude,
which keeps every distinct value of calibrated data (a 0-8 float amplitude keeps its 2^23
steps per octave; rounding to integers would leave a handful).

Geo-referencing from any CRS: lon/lat of the chip centre through pyproj, and the resolution as
the ground size of a pixel at the centre (the geometric mean of its two sides): in the CRS's
linear unit converted to metres for projected CRSs, and geodesic (pyproj.Geod on the CRS's
ellipsoid) for geographic CRSs such as EPSG:4326, whose pixel sizes are degrees.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyproj

from klip_jax.errors import RecordError

VALUE_TYPES = ("amplitude", "intensity", "db", "complex")


@dataclasses.dataclass
class Raster:
  """One band of a file as stored, which of its pixels hold data, and the file's geo fields."""

  data: np.ndarray  # [H, W], the file's dtype (complex for I/Q band pairs)
  valid: np.ndarray  # bool [H, W]
  geo: dict


def _one_line(error: BaseException) -> str:
  """The root cause's message on one line: what GDAL said (rasterio's own message is often
  "See previous exception for details")."""
  while (error.__cause__ or error.__context__) is not None and str(error.__cause__ or error.__context__):
    error = error.__cause__ or error.__context__
  return " ".join(str(error).split()) or type(error).__name__


def bands(band, count: int) -> list[int]:
  """The 1-based band(s) to read: `band` (an int, or [I, Q]), or the only band."""
  if band is None:
    if count > 1:
      raise RecordError(f"has {count} bands (e.g. polarisations); choose one with \"band\": N "
                        f"(1..{count}) in its manifest line, or [I, Q] for complex samples in two bands")
    return [1]
  chosen = [band] if isinstance(band, int) and not isinstance(band, bool) else band
  if (not isinstance(chosen, list) or len(chosen) not in (1, 2)
      or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= count for b in chosen)):
    raise RecordError(f"has no band {band!r} ({count} bands); give \"band\": N in 1..{count}, or "
                      "[I, Q] for complex samples in two bands")
  return chosen


def read(path: str, band=None, nodata: float | None = None) -> Raster:
  """Read `path` (GeoTIFF or any GDAL raster through rasterio; PNG through PIL)."""
  if nodata is not None and (isinstance(nodata, bool) or not isinstance(nodata, (int, float, np.integer, np.floating))):
    # A string "0" compares unequal to every pixel: it would mask nothing, without a word.
    raise RecordError(f"field 'nodata' is {nodata!r} ({type(nodata).__name__}), not a number; give the fill "
                      "value as a JSON number, e.g. \"nodata\": 0")
  try:
    data, valid, geo = _read_png(path, band) if path.lower().endswith(".png") else _read_gdal(path, band)
  except RecordError:
    raise
  except Exception as e:  # rasterio, GDAL, PIL: unreadable, truncated or not an image
    raise RecordError(f"cannot be read ({_one_line(e)}); re-export it (e.g. gdal_translate) or "
                      "drop its line") from None
  if nodata is not None:
    valid &= data != nodata
  valid &= np.isfinite(data)
  return Raster(data, valid, geo)


def _read_png(path: str, band):
  from PIL import Image

  with Image.open(path) as image:
    image.load()
    data = np.asarray(image)
  if data.ndim == 3:
    chosen = bands(band, data.shape[2])
    data = data[..., chosen[0] - 1] if len(chosen) == 1 else data[..., chosen[0] - 1] + 1j * data[..., chosen[1] - 1]
  elif band not in (None, 1):
    bands(band, 1)
  return data, np.ones(data.shape, bool), {}


def _read_gdal(path: str, band):
  import rasterio  # only ingest and tiling need GDAL

  with rasterio.open(path) as src:
    data, valid = read_window(src, bands(band, src.count))
    return data, valid, file_geo(src)


def read_window(src, chosen: list[int], window=None) -> tuple[np.ndarray, np.ndarray]:
  """(samples, valid) of band `chosen[0]` (complex I + jQ for an [I, Q] pair) of an open
  rasterio dataset, in `window` (default: all)."""
  data = src.read(chosen[0], window=window)
  valid = src.read_masks(chosen[0], window=window) != 0
  if len(chosen) == 2:
    data = data.astype(np.float32) + 1j * src.read(chosen[1], window=window).astype(np.float32)
    valid &= src.read_masks(chosen[1], window=window) != 0
  return data, valid


def file_geo(src) -> dict:
  """epsg (0: a CRS without an EPSG code), geotransform, centre lon/lat and resolution_m of an
  open rasterio dataset; nothing when it has no CRS."""
  if src.crs is None:
    return {}
  crs = pyproj.CRS.from_wkt(src.crs.to_wkt())
  a, b, c, d, e, f = tuple(src.transform)[:6]
  x, y = src.transform @ (src.width / 2, src.height / 2)
  lon, lat = pyproj.Transformer.from_crs(crs, 4326, always_xy=True).transform(x, y)
  return {"epsg": int(src.crs.to_epsg() or 0), "geotransform": np.array([c, a, b, f, d, e], np.float64),
          "lon": float(lon), "lat": float(lat),
          "resolution_m": pixel_size_m(crs, src.transform, src.width / 2, src.height / 2)}


def pixel_size_m(crs: pyproj.CRS, transform, col: float, row: float) -> float:
  """Ground size (metres) of the pixel at (col, row): the geometric mean of its two sides."""
  x0, y0 = transform @ (col, row)
  sides = [transform @ (col + 1, row), transform @ (col, row + 1)]
  if crs.is_geographic:  # degrees: geodesic lengths on the CRS's ellipsoid (x = lon, y = lat)
    geod = crs.get_geod()
    lengths = [geod.inv(x0, y0, x1, y1)[2] for x1, y1 in sides]
  else:
    metres = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    lengths = [math.hypot(x1 - x0, y1 - y0) * metres for x1, y1 in sides]
  return float(math.sqrt(lengths[0] * lengths[1]))


def detect_value(data: np.ndarray, valid: np.ndarray) -> str:
  """The value type of samples nobody declared (the rule in the module docstring)."""
  return value_rule(data.dtype, bool(valid.any() and not np.iscomplexobj(data) and data[valid].min() < 0))


def value_rule(dtype, has_negative: bool) -> str:
  """The detection rule: complex dtype -> complex; integer -> amplitude; float with a negative
  valid pixel -> db; other float -> amplitude."""
  dtype = np.dtype(dtype)
  if np.issubdtype(dtype, np.complexfloating):
    return "complex"
  if np.issubdtype(dtype, np.integer):
    return "amplitude"
  return "db" if has_negative else "amplitude"


def to_amplitude(raster: Raster, value: str | None) -> np.ndarray:
  """Amplitude [H, W]: uint16 for integer amplitude without invalid pixels, else float32 with
  NaN at invalid pixels. Raises RecordError (problem; fix) for samples that cannot be what
  `value` says."""
  data, valid = raster.data, raster.valid
  if value is None:
    value = detect_value(data, valid)
  if value not in VALUE_TYPES:
    raise RecordError(f"declares \"value\": {value!r}, not a value type; use one of {list(VALUE_TYPES)}")
  if np.iscomplexobj(data) != (value == "complex"):
    raise RecordError(f"holds {data.dtype} samples but its value is {value!r}; declare \"value\": "
                      + ("\"complex\" (or omit it)" if np.iscomplexobj(data) else
                         "amplitude, intensity or db, or give \"band\": [I, Q] for complex samples in two bands"))
  if not valid.any():
    raise RecordError("has no valid pixel (all nodata or NaN); drop its line or fix its nodata value")
  if value == "amplitude" and np.issubdtype(data.dtype, np.integer) and valid.all():
    if data.min() < 0 or data.max() > np.iinfo(np.uint16).max:
      raise RecordError(f"holds integer amplitudes in [{data.min()}, {data.max()}], outside uint16; "
                        "declare its value type or rescale it")
    return data.astype(np.uint16)
  if value == "complex":
    amplitude = np.abs(data.astype(np.complex128))
  else:
    samples = data.astype(np.float64)
    low = samples[valid].min()
    if value == "amplitude" and low < 0:
      raise RecordError(f"holds negative amplitudes (min {low:.4g}); declare \"value\": \"db\" if "
                        "they are decibels")
    amplitude = {"amplitude": lambda s: s, "intensity": lambda s: np.sqrt(np.maximum(s, 0.0)),
                 "db": lambda s: 10.0 ** (s / 20.0)}[value](np.where(valid, samples, 0.0))
  amplitude = np.where(valid, amplitude, np.nan).astype(np.float32)
  if np.isinf(amplitude).any():
    raise RecordError(f"gives amplitudes beyond float32 as {value!r}; check its value type")
  return amplitude
