"""Linear probes: patch labels and cell weights by hand, and the three probes on synthetic splits
whose tokens do (or do not) carry the answer."""

import numpy as np
import pytest

from klip_jax.data.records import UNKNOWN_LANDCOVER
from klip_jax.data.targets import TARGET_CLASSES
from klip_jax.eval import probes
from klip_jax.eval.truth import NoTruth, Split

U = UNKNOWN_LANDCOVER
DIM = 6


# --- patch labels -----------------------------------------------------------------------------

def test_patch_labels_hand_example():
  cover = np.array([[[0, 0, 1, U],
                     [0, 1, 1, 1],
                     [U, U, 2, 3],
                     [U, U, 3, 2]],
                    [[U, U, 5, 4],
                     [U, 4, 4, 5],
                     [1, 1, 0, 0],
                     [1, 1, 0, 0]]], np.uint8)
  labels = probes.patch_labels(cover, 2)
  # Image 0: (0,0) {0,0,0,1} -> 0; (0,1) {1,U,1,1} -> 1; (1,0) all unknown -> -1;
  #   (1,1) {2,3,3,2} tie -> 2 (smallest).
  # Image 1: (0,0) {U,U,U,4} -> 4 (unknown never wins); (0,1) {5,4,4,5} tie -> 4;
  #   (1,0) all 1 -> 1; (1,1) all 0 -> 0.
  np.testing.assert_array_equal(labels, [[[0, 1], [-1, 2]], [[4, 4], [1, 0]]])


def test_patch_labels_one_patch_per_pixel():
  cover = np.array([[[3, U], [0, 5]]], np.uint8)
  np.testing.assert_array_equal(probes.patch_labels(cover, 2), [[[3, -1], [0, 5]]])


# --- cell weights -----------------------------------------------------------------------------

def test_cell_weights_g3_is_identity():
  np.testing.assert_allclose(probes.cell_weights(3), np.eye(9), atol=1e-12)


def test_cell_weights_g6_averages_2x2_patches():
  w = probes.cell_weights(6)
  assert w.shape == (9, 36)
  for row in range(3):
    for col in range(3):
      expected = np.zeros((6, 6))
      expected[2 * row:2 * row + 2, 2 * col:2 * col + 2] = 0.25
      np.testing.assert_allclose(w[3 * row + col], expected.reshape(36), atol=1e-12)


def test_cell_weights_g4_hand_rows():
  w = probes.cell_weights(4)
  assert w.shape == (9, 16)
  np.testing.assert_allclose(w.sum(axis=1), 1.0)
  # 1D: cell [0, 1/3] covers patch [0, .25] by .25 and [.25, .5] by 1/3 - .25 = 1/12;
  # normalised by 1/3: 3/4 and 1/4. Cell 0 = outer product over rows x columns.
  cell0 = np.zeros((4, 4))
  cell0[:2, :2] = [[9 / 16, 3 / 16], [3 / 16, 1 / 16]]
  np.testing.assert_allclose(w[0], cell0.reshape(16), atol=1e-12)
  # Centre cell [1/3, 2/3]: patches [.25, .5] and [.5, .75] by 1/6 each -> 1/2, 1/2 per axis.
  cell4 = np.zeros((4, 4))
  cell4[1:3, 1:3] = 0.25
  np.testing.assert_allclose(w[4], cell4.reshape(16), atol=1e-12)
  # Upper right cell (row 0, col 2): rows as cell 0 (3/4, 1/4), columns mirrored (1/4, 3/4).
  cell2 = np.zeros((4, 4))
  cell2[:2, 2:] = np.outer([3 / 4, 1 / 4], [1 / 4, 3 / 4])
  np.testing.assert_allclose(w[2], cell2.reshape(16), atol=1e-12)


def test_cell_features_pool_and_one_hot():
  # g = 3: each cell's pooled token is its own patch token.
  tokens = np.arange(2 * 10 * 2, dtype=np.float64).reshape(2, 10, 2)
  feats = probes.cell_features(tokens)
  assert feats.shape == (18, 2 + 9)
  np.testing.assert_allclose(feats[:, :2], tokens[:, 1:].reshape(18, 2))
  np.testing.assert_allclose(feats[:, 2:], np.tile(np.eye(9), (2, 1)))


# --- synthetic splits -------------------------------------------------------------------------

def _split(records, size=12):
  n = len(records)
  return Split(name="synthetic", records=records, images=np.zeros((n, size, size, 1), np.float32),
               keywords=[[""] * 8 for _ in range(n)], captions=[""] * n,
               text_ids=np.zeros((n, 4), np.int32))


def _record(grid=None, box_classes=(), landcover=None, size=12):
  grid = np.zeros((3, 3), np.uint8) if grid is None else np.asarray(grid, np.uint8)
  n = len(box_classes)
  return {"scene_type": "target" if n else "landform",
          "truth": {"grid": grid, "boxes": np.tile(np.array([[0, 0, 2, 2]], np.float32), (n, 1)),
                    "box_classes": np.asarray(box_classes, np.int32),
                    "landcover": (np.full((size, size), U, np.uint8) if landcover is None
                                  else np.asarray(landcover, np.uint8))}}


def _positioning_data(n, rng, informative):
  records, tokens = [], rng.normal(0, 0.1, (n, 10, DIM))
  for i in range(n):
    grid = rng.uniform(size=(3, 3)) < 0.3
    grid[rng.integers(3), rng.integers(3)] = True  # at least one target
    records.append(_record(grid, [0] * int(grid.sum())))
    if informative:
      tokens[i, 1:, 0] += 2.0 * grid.reshape(9)  # patch channel 0 marks a target cell (g = 3)
  return _split(records), tokens


def test_positioning_informative_tokens():
  rng = np.random.default_rng(0)
  train, train_tokens = _positioning_data(120, rng, True)
  test, test_tokens = _positioning_data(60, rng, True)
  out = probes.positioning(train, train_tokens, test, test_tokens, seed=0)
  assert out["num_examples"] == 60
  assert out["exact_match"] >= 0.95
  assert out["f1"] >= 0.97
  assert out["chance_exact_match"] < 0.3  # random 9-cell patterns rarely repeat
  assert out["chance_f1"] < 0.75  # 2p / (1 + p) with p ~ 0.35


def test_positioning_noise_tokens_learn_nothing():
  rng = np.random.default_rng(9)
  train, train_tokens = _positioning_data(120, rng, False)
  test, test_tokens = _positioning_data(60, rng, False)
  out = probes.positioning(train, train_tokens, test, test_tokens, seed=0)
  assert out["exact_match"] <= out["chance_exact_match"] + 0.1
  assert out["f1"] < 0.5  # the informative probe reaches >= 0.97


def test_positioning_skips_chips_without_targets():
  rng = np.random.default_rng(1)
  train, train_tokens = _positioning_data(80, rng, True)
  test, test_tokens = _positioning_data(20, rng, True)
  # Append landform chips (no boxes, empty grid) with tokens that would claim targets everywhere.
  empty = [_record() for _ in range(5)]
  test = _split(test.records + empty)
  test_tokens = np.concatenate([test_tokens, np.full((5, 10, DIM), 2.0)])
  out = probes.positioning(train, train_tokens, test, test_tokens, seed=0)
  assert out["num_examples"] == 20
  assert out["exact_match"] >= 0.95


def test_positioning_without_boxes_raises():
  empty = _split([_record() for _ in range(4)])
  rng = np.random.default_rng(2)
  split, tokens = _positioning_data(10, rng, True)
  with pytest.raises(NoTruth):
    probes.positioning(split, tokens, empty, np.zeros((4, 10, DIM)), seed=0)
  with pytest.raises(NoTruth):
    probes.positioning(empty, np.zeros((4, 10, DIM)), split, tokens, seed=0)


def _classification_data(n, rng, informative, probs=(0.5, 0.3, 0.2)):
  records, tokens = [], rng.normal(0, 1.0, (n, 10, DIM))
  for i in range(n):
    cls = int(rng.choice(3, p=probs))
    records.append(_record(np.eye(3, dtype=np.uint8), [cls, cls, 5]))  # main class: cls (2 of 3)
    if informative:
      tokens[i, 0, cls] += 4.0  # the class token carries the main class
  return _split(records), tokens


def test_target_classification_informative_tokens():
  rng = np.random.default_rng(3)
  train, train_tokens = _classification_data(150, rng, True)
  test, test_tokens = _classification_data(80, rng, True)
  out = probes.target_classification(train, train_tokens, test, test_tokens, seed=0)
  truth = np.asarray([r["truth"]["box_classes"][0] for r in test.records])
  assert out["num_examples"] == 80
  assert out["accuracy"] >= 0.95
  assert out["balanced_accuracy"] >= 0.9
  # Chance: always the train majority; the class with p = 0.5 (class 0) here.
  assert out["chance_accuracy"] == pytest.approx(np.mean(truth == 0))
  assert out["chance_accuracy"] < 0.65
  assert len(out["confusion"]) == len(TARGET_CLASSES)
  assert np.sum(out["confusion"]) == 80


def test_target_classification_noise_tokens_near_chance():
  rng = np.random.default_rng(4)
  train, train_tokens = _classification_data(300, rng, False)
  test, test_tokens = _classification_data(300, rng, False)
  out = probes.target_classification(train, train_tokens, test, test_tokens, seed=0)
  assert abs(out["accuracy"] - out["chance_accuracy"]) < 0.12
  assert out["balanced_accuracy"] < 0.5  # chance balanced accuracy is 1/3


def test_main_target_class_majority_ties_smallest_and_no_boxes():
  split = _split([_record(box_classes=[4, 2, 4]), _record(box_classes=[5, 1]), _record()])
  np.testing.assert_array_equal(probes.main_target_class(split), [4, 1, -1])


def test_target_classification_raises_without_truth():
  rng = np.random.default_rng(5)
  split, tokens = _classification_data(10, rng, True)
  empty = _split([_record() for _ in range(3)])
  with pytest.raises(NoTruth):
    probes.target_classification(split, tokens, empty, np.zeros((3, 10, DIM)), seed=0)
  # A single training class is no probe either.
  one = _split([_record(box_classes=[2]) for _ in range(6)])
  with pytest.raises(NoTruth):
    probes.target_classification(one, tokens[:6], split, tokens, seed=0)


def _segmentation_data(n, rng, size=12, g=3):
  """Land cover in vertical stripes, one class per patch column (so bilinear upsampling of
  per-patch probabilities along columns stays exact); patch tokens carry the column's class."""
  p = size // g
  records, tokens = [], rng.normal(0, 0.1, (n, 1 + g * g, DIM))
  for i in range(n):
    classes = rng.integers(0, 3, g)
    cover = np.repeat(np.tile(classes, (size, 1)), p, axis=1)
    records.append(_record(landcover=cover, size=size))
    tokens[i, 1:].reshape(g, g, DIM)[:, np.arange(g), classes] += 3.0
  return _split(records, size), tokens


def test_segmentation_informative_tokens():
  rng = np.random.default_rng(6)
  train, train_tokens = _segmentation_data(40, rng)
  test, test_tokens = _segmentation_data(20, rng)
  # A test chip without land cover: its pixels are ignored.
  test = _split(test.records + [_record()], 12)
  test_tokens = np.concatenate([test_tokens, np.zeros((1, 10, DIM))])
  out = probes.segmentation(train, train_tokens, test, test_tokens, seed=0, max_patches=200)
  assert out["probe_patches"] == 200  # 40 * 9 = 360 known patches, capped
  assert out["num_images"] == 21
  assert out["miou"] >= 0.99
  assert out["pixel_accuracy"] >= 0.99
  # Chance: the train pixel majority everywhere; 3 roughly balanced classes -> mIoU ~ 1/9.
  assert out["chance_miou"] < 0.25
  assert out["chance_pixel_accuracy"] < 0.5
  assert np.sum(out["confusion"]) == 20 * 12 * 12


def test_segmentation_stripe_tokens_are_consistent():
  # The helper's token layout: patch (r, c) marks the class of column c.
  rng = np.random.default_rng(7)
  split, tokens = _segmentation_data(2, rng)
  grid = probes.patch_grid(tokens)
  cover = split.records[0]["truth"]["landcover"]
  for c in range(3):
    assert grid[0, 1, c].argmax() == cover[0, 4 * c]


def test_segmentation_raises_without_truth():
  rng = np.random.default_rng(8)
  split, tokens = _segmentation_data(5, rng)
  unknown = _split([_record() for _ in range(3)])
  with pytest.raises(NoTruth):
    probes.segmentation(unknown, np.zeros((3, 10, DIM)), split, tokens, seed=0, max_patches=100)
  with pytest.raises(NoTruth):
    probes.segmentation(split, tokens, unknown, np.zeros((3, 10, DIM)), seed=0, max_patches=100)
  single = _split([_record(landcover=np.full((12, 12), 1)) for _ in range(3)])
  with pytest.raises(NoTruth):
    probes.segmentation(single, tokens[:3], split, tokens, seed=0, max_patches=100)
