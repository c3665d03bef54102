"""SAR rasters as users hold them -> amplitude: value types, detection, nodata, bands, any CRS."""

import math
import re

import numpy as np
import pyproj
import pytest
from rasterio.transform import from_origin

from klip_jax.data import raster
from klip_jax.errors import RecordError
from tests.data import geotiffs


def _amplitude(data, value=None, valid=None):
  valid = np.ones(data.shape, bool) if valid is None else valid
  return raster.to_amplitude(raster.Raster(data, valid, {}), value)


def test_each_value_type_becomes_the_amplitude_numpy_gives():
  rng = np.random.default_rng(0)
  amplitude = rng.uniform(0.01, 8.0, (16, 16))
  cases = {"amplitude": amplitude.astype(np.float32), "intensity": (amplitude**2).astype(np.float32),
           "db": (20 * np.log10(amplitude)).astype(np.float32),
           "complex": (amplitude * np.exp(1j * rng.uniform(0, 2 * np.pi, amplitude.shape))).astype(np.complex64)}
  for value, data in cases.items():
    got = _amplitude(data, value)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, amplitude, rtol=1e-5, err_msg=value)


def test_detection_rule():
  positive = np.full((8, 8), 0.5, np.float32)
  assert raster.detect_value(positive, np.ones((8, 8), bool)) == "amplitude"
  assert raster.detect_value(positive - 1, np.ones((8, 8), bool)) == "db"
  assert raster.detect_value(np.ones((8, 8), np.uint16), np.ones((8, 8), bool)) == "amplitude"
  assert raster.detect_value(np.ones((8, 8), np.complex64), np.ones((8, 8), bool)) == "complex"
  # A negative fill value that is masked out does not make a float chip dB.
  filled = positive.copy()
  filled[0] = -9999
  valid = filled != -9999
  assert raster.detect_value(filled, valid) == "amplitude"


def test_integer_amplitude_stays_uint16_and_float_amplitude_keeps_every_value():
  dn = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
  assert _amplitude(dn).dtype == np.uint16 and np.array_equal(_amplitude(dn), dn)
  assert _amplitude(dn.astype(np.uint8)).dtype == np.uint16
  calibrated = np.linspace(0.0, 8.0, 64, dtype=np.float32).reshape(8, 8)
  assert np.array_equal(_amplitude(calibrated), calibrated)  # exact: 64 distinct values stay 64


def test_invalid_pixels_become_nan_and_negative_intensity_counts_as_zero():
  data = np.array([[1.0, -0.01], [4.0, 9.0]], np.float32)
  valid = np.array([[True, True], [False, True]])
  got = _amplitude(data, "intensity", valid)
  assert got[0, 0] == 1.0 and got[0, 1] == 0.0 and math.isnan(got[1, 0]) and got[1, 1] == 3.0
  dn = np.array([[5, 0], [7, 9]], np.uint16)
  got = _amplitude(dn, None, dn != 0)  # an integer chip with nodata: float32 so it can hold NaN
  assert got.dtype == np.float32 and math.isnan(got[0, 1]) and got[1, 1] == 9.0


def test_values_that_cannot_be_what_is_declared_are_refused():
  with pytest.raises(RecordError, match="negative amplitudes.*\"db\""):
    _amplitude(np.full((8, 8), -3.0, np.float32), "amplitude")
  with pytest.raises(RecordError, match="complex64 samples but its value is 'amplitude'"):
    _amplitude(np.ones((8, 8), np.complex64), "amplitude")
  with pytest.raises(RecordError, match="not a value type"):
    _amplitude(np.ones((8, 8), np.float32), "sigma0")
  with pytest.raises(RecordError, match="no valid pixel"):
    _amplitude(np.ones((8, 8), np.float32), None, np.zeros((8, 8), bool))


def test_geotiff_nodata_and_nan_are_invalid(tmp_path):
  data = np.full((8, 8), 2.0, np.float32)
  data[0, :3] = -9999
  data[1, 0] = np.nan
  image = raster.read(geotiffs.write(tmp_path / "a.tif", data, nodata=-9999))
  expected = np.ones((8, 8), bool)
  expected[0, :3] = expected[1, 0] = False
  assert np.array_equal(image.valid, expected)
  declared = raster.read(geotiffs.write(tmp_path / "b.tif", np.where(expected, 2.0, 0.0).astype(np.float32)), nodata=0)
  assert declared.valid.sum() == expected.sum()


def test_multi_band_files_need_a_band(tmp_path):
  dual = np.stack([np.full((8, 8), 1, np.uint16), np.full((8, 8), 2, np.uint16)])
  path = geotiffs.write(tmp_path / "dual.tif", dual)
  with pytest.raises(RecordError, match="has 2 bands.*\"band\": N"):
    raster.read(path)
  assert (raster.read(path, band=2).data == 2).all()
  with pytest.raises(RecordError, match="has no band 3"):
    raster.read(path, band=3)
  iq = raster.read(geotiffs.write(tmp_path / "iq.tif", np.stack([np.full((8, 8), 3, np.int16),
                                                                np.full((8, 8), 4, np.int16)])), band=[1, 2])
  assert np.allclose(_amplitude(iq.data, "complex"), 5.0)


def test_resolution_from_any_crs(tmp_path):
  utm = raster.read(geotiffs.write(tmp_path / "utm.tif", np.ones((8, 8), np.uint16)))
  assert utm.geo["resolution_m"] == 3.0 and utm.geo["epsg"] == 32651
  wgs = raster.read(geotiffs.write(tmp_path / "wgs.tif", np.ones((8, 8), np.uint16), geotiffs.WGS84))
  lon, lat = 120.30 + 4 * 3e-5, 36.10 - 4 * 3e-5
  geod = pyproj.Geod(ellps="WGS84")
  dx = geod.inv(lon, lat, lon + 3e-5, lat)[2]
  dy = geod.inv(lon, lat, lon, lat - 3e-5)[2]
  assert 2.6 < dx < 2.8 and 3.2 < dy < 3.4  # a degree of longitude shrinks with cos(36 deg)
  assert wgs.geo["resolution_m"] == pytest.approx(math.sqrt(dx * dy), rel=1e-9)
  assert wgs.geo["lon"] == pytest.approx(lon, abs=1e-12) and wgs.geo["lat"] == pytest.approx(lat, abs=1e-12)
  feet = raster.read(geotiffs.write(tmp_path / "ft.tif", np.ones((8, 8), np.uint16),
                                    ("EPSG:2263", from_origin(980000.0, 200000.0, 10.0, 10.0))))  # NY, US feet
  assert feet.geo["resolution_m"] == pytest.approx(10 * 0.3048006096, rel=1e-6)


def test_unreadable_files_say_so(tmp_path):
  (tmp_path / "junk.tif").write_bytes(b"this is not a tiff" * 10)
  with pytest.raises(RecordError, match="cannot be read"):
    raster.read(str(tmp_path / "junk.tif"))


def test_nodata_must_be_a_number(tmp_path):
  """A string "0" compares unequal to every pixel: it would have masked nothing."""
  data = np.full((8, 8), 1000, np.uint16)
  data[:, :2] = 0
  path = geotiffs.write(tmp_path / "fill.tif", data)
  assert raster.read(path, None, 0).valid.sum() == 48
  for nodata in ("0", True, [0]):
    with pytest.raises(RecordError, match=rf"field 'nodata' is {re.escape(repr(nodata))} \(.*\), not a number"):
      raster.read(path, None, nodata)
