"""HCoT fields from ground truth, verbalisation with spans, noise with recorded truth."""

import dataclasses

import numpy as np
import pytest

from klip_jax.data import knowledge, targets, terrain, world

CONFIG = world.WorldConfig(image_size=64)


def _chip(landcover, targets=(), pattern="", kind="lake"):
  size = landcover.shape[0]
  geo = {"city": "Venice", "country": "Italy"}
  return world.Chip("x", np.zeros((size, size), np.uint16), geo, "target" if targets else "landform",
                    kind, landcover.astype(np.uint8), list(targets), pattern)


def test_landform_fields_from_hand_built_truth():
  lc = np.full((90, 90), terrain.VEGETATION, np.uint8)
  lc[:, :20] = terrain.WATER  # 22% water along the left edge
  lc[80:, 30:] = terrain.ROAD  # 10% (a wide road band)
  fields = knowledge.landform_fields(_chip(lc))
  assert fields["distribution"] == "water mainly in the middle left"
  assert fields["boundary"] == "vegetation and water"
  assert fields["functionality"] == "agricultural production"
  assert fields["buildings"] == "absent"
  assert fields["roads"] == "sparse with a few straight roads"
  assert fields["water"] == "an enclosed lake"
  assert fields["terrain"] == "lakeside plain"


def test_target_fields_from_hand_built_truth():
  lc = np.full((90, 90), terrain.WATER, np.uint8)
  cargo = targets.TARGET_CLASSES.index(next(c for c in targets.TARGET_CLASSES if c.name == "cargo ship"))
  ships = [targets.Target(cargo, (10.0, 10.0), 121.0, 18.0, 44.0, (0, 0, 20, 20)),
           targets.Target(cargo, (45.0, 45.0), 150.0, 20.0, 226.0, (40, 40, 50, 50)),
           targets.Target(cargo, (80.0, 50.0), 99.0, 15.0, 41.0, (75, 45, 85, 55))]
  fields = knowledge.target_fields(_chip(lc, ships, "scattered", kind="sea"))
  assert fields == {"count": "3", "location": "upper left, centre and middle right",
                    "feature": "northeast-southwest", "size": "150", "category": "cargo ships",
                    "distribution": "scattered across the scene", "region": "venice, italy",
                    "environment": "open sea"}


def test_spans_cover_the_keywords_and_clauses_are_dollar_separated():
  for i in range(60):
    chip = world.make_chip(5, i, CONFIG)
    text = knowledge.describe(chip, np.random.default_rng(i), noise_rate=0.3)
    clauses = text.caption.split("$")
    assert len(clauses) == 8 == len(text.spans)
    assert text.field_names == knowledge.FIELDS[chip.scene_type]
    for (a, b), keyword in zip(text.spans, text.keywords):
      assert text.caption[a:b] == keyword and "$" not in keyword


def test_describe_is_deterministic():
  chip = world.make_chip(5, 1, CONFIG)
  a = knowledge.describe(chip, np.random.default_rng(3), 0.5)
  b = knowledge.describe(chip, np.random.default_rng(3), 0.5)
  assert dataclasses.asdict(a) == dataclasses.asdict(b)


def test_noise_corrupts_the_requested_fraction_and_records_the_truth():
  corrupted = total = 0
  for i in range(150):
    chip = world.make_chip(6, i, CONFIG)
    clean = knowledge.describe(chip, np.random.default_rng(0), 0.0)
    noisy = knowledge.describe(chip, np.random.default_rng(i), 0.2)
    assert clean.corrupted == []
    for index, true in zip(noisy.corrupted, noisy.true_keywords):
      assert true == clean.keywords[index]
      assert noisy.keywords[index] != true
    untouched = set(range(8)) - set(noisy.corrupted)
    assert all(noisy.keywords[j] == clean.keywords[j] for j in untouched)
    corrupted += len(noisy.corrupted)
    total += 8
  assert abs(corrupted / total - 0.2) < 0.03


@pytest.mark.parametrize("field", ["count", "size"])
def test_wrong_numbers_stay_plausible(field):
  rng = np.random.default_rng(0)
  for _ in range(50):
    wrong = int(knowledge._wrong_value(field, "target", "6", rng))
    assert wrong >= 1 and wrong != 6 and abs(wrong - 6) <= (2 if field == "count" else 10)


def _flipped_chip(chip: world.Chip, axis: str) -> world.Chip:
  """Flip the truth itself, independently of the text transform."""
  size = chip.landcover.shape[0]
  rows = axis == "vertical"
  landcover = chip.landcover[::-1] if rows else chip.landcover[:, ::-1]
  targets = []
  for t in chip.targets:
    cx, cy = t.center_xy
    center = (cx, size - cy) if rows else (size - cx, cy)
    heading = (180 - t.heading_deg) % 360 if rows else (360 - t.heading_deg) % 360
    targets.append(dataclasses.replace(t, center_xy=center, heading_deg=heading))
  return dataclasses.replace(chip, landcover=np.ascontiguousarray(landcover), targets=targets)


@pytest.mark.parametrize("axis", ["vertical", "horizontal"])
def test_flipped_keywords_equal_the_keywords_of_the_flipped_truth(axis):
  checked = 0
  for i in range(80):
    chip = world.make_chip(9, i, CONFIG)
    if any(min(t.center_xy) % (64 / 3) < 1e-6 for t in chip.targets):
      continue  # a centre exactly on a grid line changes cell under a flip
    fields = knowledge.FIELDS[chip.scene_type]
    describe = knowledge.target_fields if chip.scene_type == "target" else knowledge.landform_fields
    before, after = describe(chip), describe(_flipped_chip(chip, axis))
    for name in fields:
      assert knowledge.flip_keyword(chip.scene_type, name, before[name], axis) == after[name], name
    checked += 1
  assert checked > 60


def test_replace_keywords_shifts_later_spans():
  caption, spans = knowledge.verbalise("target", ["3", "upper left", "north-south", "100",
                                                  "tankers", "isolated", "oslo, norway",
                                                  "open sea"], [0] * 8)
  new = ["12", "lower left and centre", "north-south", "5", "tankers", "isolated", "oslo, norway", "open sea"]
  out, out_spans = knowledge.replace_keywords(caption, spans, new)
  assert [out[a:b] for a, b in out_spans] == new
  assert out.split("$")[0] == "the number of targets is 12 in total"


def test_a_wrong_boundary_or_location_is_never_the_true_one_reordered():
  """"vegetation and water" is the boundary "water and vegetation": drawn as a corruption it
  was recorded as wrong while saying the truth."""
  rng = np.random.default_rng(0)
  for field, true in (("boundary", "water and vegetation"), ("location", "centre and upper left")):
    scene = "landform" if field == "boundary" else "target"
    for _ in range(400):
      wrong = knowledge._wrong_value(field, scene, true, rng)
      assert set(wrong.replace(", ", " and ").split(" and ")) != set(true.split(" and ")), (field, wrong)


def test_clause_negatives_of_real_captions_with_worded_or_decimal_numbers():
  """Real captions (and proofread keywords) need not write counts and sizes as integers: the
  wrong value shifts the number they give, or brings one where they give none."""
  from klip_jax.data import fields

  entry = {"image_id": "a", "scene_type": "target", "Count": "three aircraft", "Location": "upper left",
           "Feature": "north-south", "Size": "about 35.5 m", "Category": "airliners", "Distribution": "isolated",
           "Region": "oslo, norway", "Environment": "an airport apron"}
  caption, keywords, spans = fields.verbalise(fields.parse(entry, "x"))
  assert keywords[0] == "three" and keywords[3] == "35.5"
  for count in ("three", "several"):
    keywords[0] = count
    changed = set()
    for seed in range(60):
      negative, new_spans, k = knowledge.clause_negative("target", knowledge.FIELDS["target"], keywords, caption,
                                                         spans, np.random.default_rng(seed))
      wrong = negative[slice(*new_spans[k])]
      if k in (0, 3):
        changed.add(k)
        true = fields.number_value(keywords[k])
        assert fields.number_value(wrong) not in (None, true), (keywords[k], wrong)
        if true is not None:  # a nearby number: within two steps of 1 (count) or 15 m (size, 40% of 35.5 m)
          assert 0 < abs(float(wrong) - float(true)) <= (2 if k == 0 else 30), (keywords[k], wrong)
    assert changed == {0, 3}
