"""ITM evaluation with a stand-in runner whose logits follow a known rule: a perfect head, heads at
their prior, a head fooled only by hard negatives; which captions become the negatives."""

import numpy as np
import pytest

from klip_jax.eval import matching
from klip_jax.eval.truth import NoTruth

approx = pytest.approx
N = 4
NEAREST = np.array([2, 0, 3, 1])  # the other caption each image is closest to by ITC
SIGMOID_4 = 0.9820137900379085  # softmax([0, 4])[1] = 1 / (1 + e^-4)


class FakeSplit:
  """Caption i's ids are [i, 7, 7]: the runner reads which caption a pair holds off token 0."""

  def __init__(self, n):
    self.text_ids = np.stack([np.arange(n), np.full(n, 7), np.full(n, 7)], axis=1)

  def __len__(self):
    return len(self.text_ids)


class FakeRunner:
  """itm_logits [N, 2] = [0, match(image rows, caption index)]; records the pairs it scores."""

  def __init__(self, match):
    self.match, self.rows, self.texts = match, None, None

  def itm_logits(self, image_tokens, ids, rows=None):
    rows = np.arange(len(ids)) if rows is None else rows
    self.rows, self.texts = rows, ids[:, 0]
    match = np.asarray(self.match(rows, ids[:, 0]), np.float32)
    return np.stack([np.zeros_like(match), match], axis=1)


def features():
  """Orthonormal caption features; image i = caption i + 0.5 * caption NEAREST[i], so its ITC
  similarities are 1 (own), 0.5 (NEAREST[i]) and 0 (the other two)."""
  text_feat = np.eye(N)
  return text_feat + 0.5 * text_feat[NEAREST], text_feat


def run(match, seed=0):
  runner = FakeRunner(match)
  image_feat, text_feat = features()
  out = matching.evaluate(runner, FakeSplit(N), np.zeros((N, 3, 2)), image_feat, text_feat, seed)
  return out, runner


def test_perfect_head():
  out, runner = run(lambda rows, texts: np.where(rows == texts, 4.0, -4.0))
  assert (out["auc"], out["auc_hard"], out["auc_random"]) == (1.0, 1.0, 1.0)
  assert out["accuracy"] == 1.0 and out["balanced_accuracy"] == 1.0
  assert out["mean_match_prob_pos"] == approx(SIGMOID_4)
  assert out["mean_match_prob_neg"] == approx(1 - SIGMOID_4)
  assert out["chance_auc"] == 0.5 and out["chance_balanced_accuracy"] == 0.5
  assert out["chance_accuracy"] == approx(2 / 3)
  assert out["num_images"] == N
  # Pairs: every image three times (own caption, hard negative, random negative).
  np.testing.assert_array_equal(runner.rows, np.tile(np.arange(N), 3))
  np.testing.assert_array_equal(runner.texts[:N], np.arange(N))


def test_hard_negative_is_itc_nearest_other_caption():
  _, runner = run(lambda rows, texts: np.zeros(len(rows)))
  np.testing.assert_array_equal(runner.texts[N:2 * N], NEAREST)
  random = runner.texts[2 * N:]
  assert (random != np.arange(N)).all()
  image_feat, text_feat = features()
  hard, random_again = matching.negatives(FakeSplit(N).text_ids, image_feat, text_feat, seed=0)
  np.testing.assert_array_equal(hard, NEAREST)
  np.testing.assert_array_equal(random_again, random)


@pytest.mark.parametrize("logits", [(0.3, -0.2), (0.0, 0.0)])
def test_head_at_its_prior(logits):
  # Constant logits: every pair gets the same probability (< 0.5, or exactly 0.5: not above it),
  # so all pairs tie (AUC 1/2) and all are called "no match": right on the 2N negatives of 3N.
  runner = FakeRunner(None)
  runner.itm_logits = lambda image_tokens, ids, rows=None: np.tile(np.float32(logits), (len(ids), 1))
  image_feat, text_feat = features()
  out = matching.evaluate(runner, FakeSplit(N), np.zeros((N, 3, 2)), image_feat, text_feat, 0)
  assert (out["auc"], out["auc_hard"], out["auc_random"]) == (0.5, 0.5, 0.5)
  assert out["accuracy"] == approx(2 / 3)
  assert out["balanced_accuracy"] == 0.5  # recall 0 on positives, 1 on negatives
  assert out["mean_match_prob_pos"] == approx(out["mean_match_prob_neg"])


def test_head_always_match():
  out, _ = run(lambda rows, texts: np.ones(len(rows)))
  assert out["accuracy"] == approx(1 / 3)  # only the N positives of 3N are right
  assert out["balanced_accuracy"] == 0.5
  assert out["auc"] == 0.5


def test_head_fooled_by_hard_negatives():
  # Match for the own caption and the ITC-nearest one: positives tie with hard negatives
  # (AUC 1/2) and beat random ones (AUC 1, given no random negative is the nearest caption);
  # over all negatives, half tie and half lose: 3/4. Decisions: N positives and N random
  # negatives right, N hard negatives wrong -> accuracy 2/3; recall 1 and 1/2 -> balanced 3/4.
  out, runner = run(lambda rows, texts: np.where((texts == rows) | (texts == NEAREST[rows]), 4.0, -4.0),
                    seed=7)
  assert not (runner.texts[2 * N:] == NEAREST).any(), "seed 7 must draw no nearest caption"
  assert out["auc_hard"] == 0.5
  assert out["auc_random"] == 1.0
  assert out["auc"] == approx(0.75)
  assert out["accuracy"] == approx(2 / 3)
  assert out["balanced_accuracy"] == approx(0.75)


def test_identical_captions_are_never_negatives():
  ids = FakeSplit(N).text_ids
  ids[1] = ids[0]  # captions 0 and 1 are the same text
  text_feat = np.eye(N)
  image_feat = np.array([[1.0, 0.9, 0.0, 0.5],  # nearest other is 1 (same text): next is 3
                         [0.8, 1.0, 0.3, 0.0],  # nearest other is 0 (same text): next is 2
                         [0.0, 0.7, 1.0, 0.2],  # nearest other is 1
                         [0.1, 0.0, 0.6, 1.0]])  # nearest other is 2
  hard, _ = matching.negatives(ids, image_feat, text_feat, seed=0)
  np.testing.assert_array_equal(hard, [3, 2, 1, 2])
  for seed in range(50):
    _, random = matching.negatives(ids, image_feat, text_feat, seed)
    assert set(random[:2]) <= {2, 3}
    assert random[2] != 2 and random[3] != 3


def test_random_negative_is_uniform_over_other_captions():
  # Image 0 of 3 draws caption 1 or 2, each half of the time.
  ids = FakeSplit(3).text_ids
  draws = np.array([matching.negatives(ids, np.eye(3), np.eye(3), seed)[1][0] for seed in range(2000)])
  assert set(draws) == {1, 2}
  assert np.mean(draws == 1) == approx(0.5, abs=0.05)


def test_no_truth():
  with pytest.raises(NoTruth):  # one example: no other caption
    matching.evaluate(FakeRunner(None), FakeSplit(1), np.zeros((1, 3, 2)), np.eye(1), np.eye(1), 0)
  split = FakeSplit(3)
  split.text_ids[:] = split.text_ids[0]  # every caption the same text
  with pytest.raises(NoTruth):
    matching.evaluate(FakeRunner(None), split, np.zeros((3, 3, 2)), np.eye(3), np.eye(3), 0)
