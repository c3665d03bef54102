"""The synthetic world: determinism, physics measured on its output, geo and truth."""

import numpy as np
import pyproj
import pytest

from klip_jax.data import radar, targets, terrain, world

CONFIG = world.WorldConfig(image_size=64)


def test_same_seed_same_bytes_other_seed_other_bytes():
  a, b = world.make_chip(7, 3, CONFIG), world.make_chip(7, 3, CONFIG)
  assert a.image.tobytes() == b.image.tobytes()
  assert a.landcover.tobytes() == b.landcover.tobytes()
  assert a.geo["geotransform"].tolist() == b.geo["geotransform"].tolist()
  assert [t.box for t in a.targets] == [t.box for t in b.targets]
  assert world.make_chip(8, 3, CONFIG).image.tobytes() != a.image.tobytes()
  assert world.make_chip(7, 3, CONFIG, split="val").image.tobytes() != a.image.tobytes()


def test_mean_amplitude_orders_water_vegetation_urban():
  means = {c: [] for c in (terrain.WATER, terrain.VEGETATION, terrain.URBAN)}
  for i in range(150):
    chip = world.make_chip(0, i, CONFIG)
    near_target = np.zeros_like(chip.landcover, bool)
    for t in chip.targets:  # bright hulls are not the land cover's own backscatter
      x0, y0, x1, y1 = t.box
      near_target[max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3] = True
    for cls in means:
      mask = (chip.landcover == cls) & ~near_target
      if mask.sum() > 100:
        means[cls].append(chip.image[mask].astype(float).mean())
  water, vegetation, urban = (np.mean(means[c]) for c in (terrain.WATER, terrain.VEGETATION, terrain.URBAN))
  assert water < vegetation < urban, (water, vegetation, urban)


@pytest.mark.parametrize("looks", [1, 4])
def test_homogeneous_region_speckle_matches_l_look_theory(looks):
  """Intensity of L-look speckle over a constant sigma0 has coefficient of variation 1/sqrt(L)."""
  size = 256
  landcover = np.full((size, size), terrain.VEGETATION, np.uint8)
  image = radar.form_image(np.random.default_rng(0), landcover, None, None, [],
                           np.zeros((size, size), bool), res=5.0, incidence=30.0, band="C",
                           pol="VV", looks=looks, nesz_db=-28.0)
  intensity = image.astype(np.float64) ** 2
  cv = intensity.std() / intensity.mean()
  assert abs(cv - 1 / np.sqrt(looks)) <= 0.1 / np.sqrt(looks), cv


def test_radar_shadow_length_is_height_times_tan_incidence():
  """A 10 m wall seen at 45 degrees with 1 m pixels hides the next 10 pixels of ground."""
  height = np.zeros((1, 40))
  height[0, 5] = 10.0
  shadow = radar.radar_shadow(height, res=1.0, incidence_deg=45.0)[0]
  assert np.flatnonzero(shadow).tolist() == list(range(6, 16))
  # At 30 degrees the shadow is 10 * tan(30) = 5.77 m long: it ends at 11.77 m, so the pixel
  # centred at 11.5 m is the last one in shadow.
  shadow = radar.radar_shadow(height, res=1.0, incidence_deg=30.0)[0]
  assert np.flatnonzero(shadow).tolist() == list(range(6, 12))


def _targets(n_chips=120):
  config = world.WorldConfig(image_size=128, target_fraction=1.0)
  for i in range(n_chips):
    chip = world.make_chip(1, i, config)
    for t in chip.targets:
      yield chip, t


def test_target_pixel_extent_matches_size_over_resolution():
  checked = 0
  for chip, t in _targets():
    cls = targets.TARGET_CLASSES[t.cls]
    if cls.category != "ship":
      continue
    res = chip.geo["resolution_m"]
    h = np.deg2rad(t.heading_deg)
    x0, y0, x1, y1 = t.box
    # A hull of length L and beam W rotated by h spans between L|sin h| and L|sin h| + W|cos h|
    # metres east-west (and the same with cos/sin north-south); pixels add up to 2 of slack.
    for extent_px, along, across in ((x1 - x0, abs(np.sin(h)), abs(np.cos(h))),
                                     (y1 - y0, abs(np.cos(h)), abs(np.sin(h)))):
      low = t.length_m * along / res
      high = (t.length_m * along + t.width_m * across) / res
      assert low - 2 <= extent_px <= high + 2, (cls.name, res, t, extent_px, low, high)
    checked += 1
  assert checked > 20


def test_truth_is_consistent_with_targets():
  for chip, t in _targets(40):
    x0, y0, x1, y1 = t.box
    assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
    cx, cy = t.center_xy
    assert chip.grid[int(3 * cy / 128), int(3 * cx / 128)] == 1
    assert chip.counts.sum() == len(chip.targets)
    allowed = terrain.WATER if targets.TARGET_CLASSES[t.cls].category == "ship" else terrain.RUNWAY
    assert chip.landcover[int(cy), int(cx)] == allowed


def test_geotransform_centre_projects_back_to_lon_lat():
  for i in range(10):
    chip = world.make_chip(2, i, CONFIG)
    x0, dx, _, y0, _, dy = chip.geo["geotransform"]
    centre = (x0 + dx * 32, y0 + dy * 32)
    to_wgs84 = pyproj.Transformer.from_crs(chip.geo["epsg"], 4326, always_xy=True)
    lon, lat = to_wgs84.transform(*centre)
    assert abs(lon - chip.geo["lon"]) < 1e-6 and abs(lat - chip.geo["lat"]) < 1e-6
    assert dx == chip.geo["resolution_m"] == -dy


def test_landform_and_target_scenes_both_occur_with_all_landcover_classes():
  chips = [world.make_chip(4, i, CONFIG) for i in range(200)]
  assert {c.scene_type for c in chips} == {"landform", "target"}
  seen = set(np.unique(np.concatenate([c.landcover.ravel() for c in chips])))
  assert seen == set(range(len(terrain.LANDCOVER)))
  assert {c.scene_kind for c in chips} == set(world.SCENE_KINDS)


@pytest.mark.parametrize("size,scale_px", [(32, 300.0), (256, 8.0)])
def test_gaussian_surface_has_unit_variance_and_the_gradient_of_its_covariance(size, scale_px):
  """Covariance exp(-r^2 / (4 s^2)): unit variance and a gradient std of sqrt(-C''(0)) =
  1 / (sqrt(2) s) per axis, whether the chip is smaller or larger than the correlation length."""
  fields = np.stack([terrain.gaussian_surface(np.random.default_rng(i), size, scale_px) for i in range(600)])
  centre = size // 2
  assert abs(fields[:, centre, centre].var() - 1) < 0.15
  expected = 1 / (np.sqrt(2) * scale_px)
  # A one-pixel difference measures the gradient to within a few % when s >> 1 px.
  measured = np.diff(fields, axis=2)[:, centre, centre].std()
  assert abs(measured / expected - 1) < 0.1, (measured, expected)


def test_hills_in_a_chip_smaller_than_a_hill_still_have_relief():
  """Hills 250-900 m across seen by a 32 m chip: part of a hillside (before: a flat plane in
  most chips, the "hilly area" of the caption nowhere in the image)."""
  flat = 0
  for i in range(100):
    _, z, _ = terrain.GENERATORS["hills"](np.random.default_rng(i), 32, 1.0, False)
    flat += np.ptp(z) < 0.1
  assert flat <= 5, flat


def test_a_target_kind_without_targets_is_a_landform_scene_without_a_pattern():
  config = world.WorldConfig(image_size=32, target_fraction=1.0)
  chips = [world.make_chip(3, i, config) for i in range(150)]
  empty = [c for c in chips if c.scene_kind in world.TARGET_KINDS and not c.targets]
  assert len(empty) > 5
  assert all(c.scene_type == "landform" and c.target_pattern == "" for c in empty)
  assert all(c.target_pattern in targets.TARGET_PATTERNS for c in chips if c.targets)
