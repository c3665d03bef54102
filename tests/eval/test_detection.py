"""Detection probe: COCO mAP@0.5 against hand-computed values, targets, decoding, chance level,
and training on synthetic token grids that do (or do not) carry the boxes."""

import math

import numpy as np
import pytest

from klip_jax.eval import detection

G, IMAGE_SIZE, DIM, CLASSES = 4, 32, 16, 2
CELL = IMAGE_SIZE / G


def _boxes(*boxes):
  return np.array(boxes, np.float32).reshape(-1, 4)


def _classes(*classes):
  return np.array(classes, np.int64)


def _synthetic(n: int, rng: np.random.Generator, informative: bool):
  """Token grids with 0-2 boxes (8-20 px, inside the image) per image, centres in non-adjacent
  cells (so 3x3 local-max suppression never hides a true box). Informative tokens hold, at each
  centre cell, the class one-hot (x3), the log size in cells and the in-cell offset; otherwise
  tokens are pure noise."""
  tokens = rng.normal(0, 0.05, (n, G, G, DIM)).astype(np.float32)
  boxes, classes = [], []
  for i in range(n):
    b, c, cells = [], [], []
    for _ in range(rng.integers(0, 3)):
      while True:
        size = rng.uniform(8, 20, 2)
        centre = rng.uniform(0, IMAGE_SIZE - size) + size / 2
        col, row = (centre // CELL).astype(int)
        if all(max(abs(row - r), abs(col - q)) >= 2 for r, q in cells):
          break
      cells.append((row, col))
      cls = int(rng.integers(0, CLASSES))
      b.append([*(centre - size / 2), *(centre + size / 2)])
      c.append(cls)
      if informative:
        tokens[i, row, col, cls] += 3.0
        tokens[i, row, col, CLASSES:CLASSES + 2] += np.log(size / CELL)
        tokens[i, row, col, CLASSES + 2:CLASSES + 4] += centre / CELL - [col, row]
    boxes.append(_boxes(*b))
    classes.append(_classes(*c))
  return tokens, boxes, classes


def _splits(informative: bool, seed: int = 0):
  rng = np.random.default_rng(seed)
  return _synthetic(128, rng, informative), _synthetic(64, rng, informative)


def _evaluate(train, test, **kwargs):
  return detection.evaluate(*train, *test, image_size=IMAGE_SIZE, num_classes=CLASSES, **kwargs)


# --- map_at_50 -------------------------------------------------------------------------------


def _map(gt_boxes, gt_classes, det_boxes, det_classes, det_scores, image_size=100):
  return detection.map_at_50(gt_boxes, gt_classes, det_boxes, det_classes, det_scores, image_size)


def test_map_perfect_detections_is_one():
  gt = [_boxes([0, 0, 10, 10], [50, 50, 70, 60]), _boxes([5, 5, 25, 45])]
  cls = [_classes(0, 1), _classes(1)]
  scores = [np.array([0.9, 0.8]), np.array([0.7])]
  assert _map(gt, cls, gt, cls, scores) == pytest.approx(1.0)


def test_map_no_detections_is_zero_and_no_ground_truth_is_nan():
  gt, cls = [_boxes([0, 0, 10, 10]), _boxes()], [_classes(0), _classes()]
  empty = [_boxes(), _boxes()], [_classes(), _classes()], [np.zeros(0), np.zeros(0)]
  assert _map(gt, cls, *empty) == 0.0
  assert math.isnan(_map([_boxes()], [_classes()], [_boxes([0, 0, 5, 5])], [_classes(0)], [np.ones(1)]))


def test_map_detections_shifted_below_iou_half_score_zero():
  gt = [_boxes([0, 0, 10, 10], [40, 40, 60, 60])]
  shifted = [_boxes([6, 0, 16, 10], [40, 52, 60, 72])]  # IoU 4/16 = 0.25 and 8/32 = 0.25
  assert _map(gt, [_classes(0, 0)], shifted, [_classes(0, 0)], [np.array([0.9, 0.8])]) == 0.0


def test_map_hand_computed_precision_recall_curve():
  gt, cls = [_boxes([0, 0, 10, 10], [20, 20, 30, 30])], [_classes(0, 0)]
  det = [_boxes([0, 0, 10, 10], [0, 60, 10, 70], [20, 20, 30, 30])]  # TP, FP, TP
  # Ranked: P = 1, 1/2, 2/3 at R = 1/2, 1/2, 1; interpolated P is 1 for R <= 0.5 (51 of
  # COCO's 101 recall points) and 2/3 for R in 0.51..1 (50 points).
  expected = (51 * 1.0 + 50 * (2 / 3)) / 101
  assert _map(gt, cls, det, [_classes(0, 0, 0)], [np.array([0.9, 0.8, 0.7])]) == pytest.approx(expected, abs=1e-6)


def test_map_iou_exactly_half_matches_and_just_below_does_not():
  gt, cls, score = [_boxes([0, 0, 10, 10])], [_classes(0)], [np.array([0.9])]
  assert _map(gt, cls, [_boxes([0, 0, 10, 20])], cls, score) == pytest.approx(1.0)  # IoU 100/200
  assert _map(gt, cls, [_boxes([0, 0, 10, 21])], cls, score) == 0.0  # IoU 100/210


def test_map_averages_over_classes_with_ground_truth():
  gt, cls = [_boxes([0, 0, 10, 10], [50, 50, 60, 60])], [_classes(0, 1)]
  # Class 0 found (AP 1), class 1 missed (AP 0), class 2 has no ground truth: ignored.
  det = [_boxes([0, 0, 10, 10], [70, 70, 80, 80], [20, 20, 30, 30])]
  assert _map(gt, cls, det, [_classes(0, 1, 2)], [np.array([0.9, 0.8, 0.95])]) == pytest.approx(0.5)


def test_map_false_positive_on_image_without_boxes_counts():
  gt, cls = [_boxes([0, 0, 10, 10]), _boxes()], [_classes(0), _classes()]
  det = [_boxes([0, 0, 10, 10]), _boxes([0, 0, 10, 10])]
  # Ranked FP (0.9) then TP (0.5): precision 1/2 at recall 1 -> AP 0.5 at every recall point.
  assert _map(gt, cls, det, [_classes(0), _classes(0)], [np.array([0.5]), np.array([0.9])]) == pytest.approx(0.5)


# --- targets, decode, chance -----------------------------------------------------------------


def test_targets_small_box_is_a_single_peak_with_log_size_and_offset():
  t = detection.targets([_boxes([9, 2, 15, 14])], [_classes(1)], grid=G, image_size=IMAGE_SIZE, num_classes=2)
  # Centre (12, 8) px -> cell (row 1, col 1), offset (0.5, 0.0); size (6, 12) px = (0.75, 1.5) cells.
  expected_heat = np.zeros((1, G, G, 2), np.float32)
  expected_heat[0, 1, 1, 1] = 1.0
  np.testing.assert_array_equal(t["heat"], expected_heat)
  np.testing.assert_array_equal(np.argwhere(t["mask"]), [[0, 1, 1]])
  np.testing.assert_allclose(t["size"][0, 1, 1], np.log([0.75, 1.5]), rtol=1e-6)
  np.testing.assert_allclose(t["offset"][0, 1, 1], [0.5, 0.0], atol=1e-6)


def test_targets_large_box_splats_a_gaussian_of_radius_one():
  t = detection.targets([_boxes([0, 0, 32, 32])], [_classes(0)], grid=G, image_size=IMAGE_SIZE, num_classes=1)
  # 4x4-cell box: CenterNet radius min(7.63, 14.69, 1.09) -> 1 cell, sigma (2 * 1 + 1) / 6 = 0.5.
  heat = t["heat"][0, :, :, 0]
  assert heat[2, 2] == 1.0
  np.testing.assert_allclose([heat[1, 2], heat[2, 3], heat[3, 2], heat[2, 1]], np.exp(-2.0), rtol=1e-6)
  np.testing.assert_allclose([heat[1, 1], heat[3, 3]], np.exp(-4.0), rtol=1e-6)
  assert heat[0].sum() == 0 and heat[:, 0].sum() == 0  # two cells away: outside the radius


def test_targets_shared_centre_cell_keeps_both_peaks_and_the_larger_size():
  boxes = _boxes([10, 10, 14, 14], [4, 4, 20, 20])  # both centred at (12, 12) -> cell (1, 1)
  t = detection.targets([boxes], [_classes(0, 1)], grid=G, image_size=IMAGE_SIZE, num_classes=2)
  assert t["heat"][0, 1, 1, 0] == 1.0 and t["heat"][0, 1, 1, 1] == 1.0
  np.testing.assert_allclose(t["size"][0, 1, 1], np.log([2.0, 2.0]), rtol=1e-6)
  assert t["mask"].sum() == 1


def test_decode_boxes_local_max_suppression_and_cap():
  out = np.full((1, 2, 2, 2 + 4), -10.0, np.float32)  # grid 2, image 16 px -> 8 px cells
  out[0, :, :, 2:] = 0.0  # size 1 cell, offset 0.5
  out[0, 0, 0, 0] = 3.0
  out[0, 0, 1, 0] = 1.0  # same class next to a stronger peak: suppressed
  out[0, 0, 1, 1] = 2.0  # other class at that cell: kept
  out[0, 0, 1, 2:4] = np.log(2.0)  # 16 px wide and high
  boxes, classes, scores = detection.decode(out, image_size=16, num_classes=2, max_detections=20)
  np.testing.assert_allclose(boxes[0], [[0, 0, 8, 8], [4, 0, 16, 12]], atol=1e-5)  # 2nd clipped
  np.testing.assert_array_equal(classes[0], [0, 1])
  np.testing.assert_allclose(scores[0], [1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-2))], rtol=1e-6)
  capped = detection.decode(out, image_size=16, num_classes=2, max_detections=1)
  np.testing.assert_array_equal(capped[1][0], [0])


def test_chance_detections_use_class_mean_size_and_train_priors():
  train_boxes = [_boxes([0, 0, 8, 4], [2, 2, 14, 10]), _boxes([10, 10, 14, 14])]
  train_classes = [_classes(0, 0), _classes(1)]
  boxes, classes, scores = detection.chance_detections(train_boxes, train_classes, 3, grid=2, image_size=16,
                                                       num_classes=3)
  assert len(boxes) == 3 and all(np.array_equal(b, boxes[0]) for b in boxes)
  assert len(boxes[0]) == 8  # 4 cells x the 2 classes seen in training
  # Class 0: P = 2/3, mean size (10, 6), centres in cells (0, 0) and (0, 1): P(cell) = 2/6.
  # Class 1: P = 1/3, size (4, 4), centre in cell (1, 1): P(cell) = 2/5, others 1/5.
  top0 = np.flatnonzero(classes[0] == 0)[0]
  np.testing.assert_allclose(boxes[0][top0], [0, 1, 9, 7])  # (4, 4) +- (5, 3), clipped
  np.testing.assert_allclose(scores[0][classes[0] == 0], [2 / 9, 2 / 9, 1 / 9, 1 / 9])
  np.testing.assert_allclose(scores[0][classes[0] == 1], [2 / 15, 1 / 15, 1 / 15, 1 / 15])
  np.testing.assert_allclose(boxes[0][classes[0] == 1][0], [10, 10, 14, 14])


# --- training ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def informative():
  train, test = _splits(informative=True)
  return train, test, _evaluate(train, test, steps=300)


def test_head_learns_boxes_from_informative_tokens(informative):
  _, test, result = informative
  assert result["map50"] > 0.9
  assert result["chance_map50"] < 0.1
  assert result["num_test_images"] == 64
  assert result["num_test_boxes"] == sum(len(c) for c in test[2])
  assert any(len(c) == 0 for c in test[2])  # images without boxes take part
  assert np.isfinite(result["final_loss"])


def test_head_on_uninformative_tokens_stays_near_chance():
  train, test = _splits(informative=False)
  result = _evaluate(train, test, steps=300)
  assert result["map50"] < result["chance_map50"] + 0.05


def test_same_seed_gives_identical_results(informative):
  train, test, _ = informative
  assert _evaluate(train, test, steps=50, seed=1) == _evaluate(train, test, steps=50, seed=1)


def test_no_train_boxes_raises():
  (tokens, boxes, classes), test = _splits(informative=True)
  with pytest.raises(ValueError, match="detection needs target boxes in the train split"):
    _evaluate((tokens, [_boxes()] * len(boxes), [_classes()] * len(classes)), test, steps=1)


def test_test_split_without_boxes_gives_nan(informative):
  train, (tokens, boxes, classes), _ = informative
  result = _evaluate(train, (tokens, [_boxes()] * len(boxes), [_classes()] * len(classes)), steps=1)
  assert math.isnan(result["map50"]) and math.isnan(result["chance_map50"])
  assert result["num_test_boxes"] == 0
