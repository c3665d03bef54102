"""Benchmark metrics against hand-computed values on tiny inputs: perfect, random and
adversarial rankings, re-ranking, classification, mIoU, multilabel, captions and VQA ranking."""

import numpy as np
import pytest

from klip_jax.eval import metrics, retrieval

approx = pytest.approx


def _ranked_rows(ranks, rng):
  """A score matrix whose row i puts the correct item i at 0-based rank ranks[i] (no ties)."""
  n = len(ranks)
  scores = np.zeros((n, n))
  for i, r in enumerate(ranks):
    others = [j for j in rng.permutation(n) if j != i]
    order = others[:r] + [i] + others[r:]  # column order, best first
    scores[i, order] = np.arange(n, 0, -1)  # n, n-1, ..., 1
  return scores


# --- recall@k ---------------------------------------------------------------------------------

def test_recall_perfect_ranking():
  rng = np.random.default_rng(0)
  scores = 10 * np.eye(12) + rng.uniform(0, 1, (12, 12))  # diagonal always >= 10 > 1
  out = metrics.recall_at_k(scores)
  for d in ("i2t", "t2i"):
    for k in (1, 5, 10):
      assert out[f"{d}_r{k}"] == 1.0
  assert out["r_mean"] == 1.0
  # Chance R@k = k / N with N = 12.
  assert out["chance_r1"] == approx(1 / 12)
  assert out["chance_r5"] == approx(5 / 12)
  assert out["chance_r10"] == approx(10 / 12)
  assert out["chance_r_mean"] == approx((1 + 5 + 10) / 36)  # = 4/9


def test_recall_adversarial_ranking():
  rng = np.random.default_rng(1)
  scores = rng.uniform(1, 2, (12, 12))
  np.fill_diagonal(scores, 0.0)  # the correct item is always ranked last (rank 11 of 0..11)
  out = metrics.recall_at_k(scores, ks=(1, 5, 10, 11, 12, 20))
  for d in ("i2t", "t2i"):
    for k in (1, 5, 10, 11):
      assert out[f"{d}_r{k}"] == 0.0
    assert out[f"{d}_r12"] == 1.0  # k = N: everything is in the top N
    assert out[f"{d}_r20"] == 1.0
  assert out["chance_r11"] == approx(11 / 12)
  assert out["chance_r12"] == 1.0
  assert out["chance_r20"] == 1.0  # min(20 / 12, 1)
  # r_mean over 2 directions x 6 ks: 2 ones per direction out of 6.
  assert out["r_mean"] == approx(2 / 6)


def test_recall_hand_4x4_with_transpose():
  s = np.array([[0.9, 0.1, 0.5, 0.2],
                [0.8, 0.7, 0.3, 0.0],
                [0.6, 0.4, 0.2, 0.95],
                [0.3, 0.2, 0.1, 0.05]])
  # i2t (rows): row0 0.9 best -> rank 0; row1 0.7 < 0.8 -> 1; row2 0.2 < .6,.4,.95 -> 3;
  #   row3 0.05 < .3,.2,.1 -> 3. R@1 = 1/4, R@2 = 2/4, R@3 = 2/4.
  # t2i (columns): col0 0.9 best -> 0; col1 0.7 best -> 0; col2 0.2 < .5,.3 -> 2;
  #   col3 0.05 < .2,.95 -> 2. R@1 = 2/4, R@2 = 2/4, R@3 = 4/4.
  out = metrics.recall_at_k(s, ks=(1, 2, 3))
  assert [out[f"i2t_r{k}"] for k in (1, 2, 3)] == approx([0.25, 0.5, 0.5])
  assert [out[f"t2i_r{k}"] for k in (1, 2, 3)] == approx([0.5, 0.5, 1.0])
  assert out["r_mean"] == approx((0.25 + 0.5 + 0.5 + 0.5 + 0.5 + 1.0) / 6)
  assert [out[f"chance_r{k}"] for k in (1, 2, 3)] == approx([0.25, 0.5, 0.75])
  assert out["chance_r_mean"] == approx(0.5)
  # Passing the transpose explicitly is the same; passing it as i2t swaps the directions.
  assert metrics.recall_at_k(s, s.T, ks=(1, 2, 3)) == out
  swapped = metrics.recall_at_k(s.T, ks=(1, 2, 3))
  assert [swapped[f"i2t_r{k}"] for k in (1, 2, 3)] == approx([0.5, 0.5, 1.0])


def test_recall_hand_ranks_r1_r5_r10_and_separate_t2i():
  ranks = [0, 0, 1, 3, 4, 5, 6, 8, 9, 10, 11, 2]
  i2t = _ranked_rows(ranks, np.random.default_rng(2))
  # Hits: rank < 1: 2 rows; < 5: ranks 0,0,1,3,4,2 -> 6 rows; < 10: all but 10, 11 -> 10 rows.
  t2i = _ranked_rows([11] * 12, np.random.default_rng(3))  # every text's image ranked last
  out = metrics.recall_at_k(i2t, t2i)
  assert out["i2t_r1"] == approx(2 / 12)
  assert out["i2t_r5"] == approx(6 / 12)
  assert out["i2t_r10"] == approx(10 / 12)
  assert out["t2i_r1"] == out["t2i_r5"] == out["t2i_r10"] == 0.0
  assert out["r_mean"] == approx((2 + 6 + 10) / 12 / 6)
  # With the default t2i (the transpose) the t2i recalls differ from the explicit matrix's.
  assert metrics.recall_at_k(i2t)["t2i_r10"] > 0.0


def test_recall_ties_count_for_the_correct_item():
  # Row 0: correct 1 ties with item 1's 1 -> rank 0. Row 1: 1 > 0 -> rank 0.
  out = metrics.recall_at_k(np.array([[1.0, 1.0], [0.0, 1.0]]), ks=(1,))
  assert out["i2t_r1"] == 1.0
  assert out["t2i_r1"] == 1.0  # transpose [[1, 0], [1, 1]]: row 1 ties too
  constant = metrics.recall_at_k(np.zeros((6, 6)), ks=(1,))
  assert constant["i2t_r1"] == constant["t2i_r1"] == 1.0
  # A tie with a wrong item does not help when another item scores strictly higher.
  out = metrics.recall_at_k(np.array([[1.0, 2.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), ks=(1, 2))
  assert out["i2t_r1"] == approx(2 / 3)  # row 0: 2.0 > 1.0 -> rank 1 (the tie adds nothing)
  assert out["i2t_r2"] == 1.0


def test_recall_random_scores_near_chance():
  rng = np.random.default_rng(4)
  n, trials, ks = 20, 200, (1, 5, 10)
  runs = [metrics.recall_at_k(rng.normal(size=(n, n)), ks=ks) for _ in range(trials)]
  for k in ks:
    for d in ("i2t", "t2i"):
      mean = np.mean([r[f"{d}_r{k}"] for r in runs])
      assert mean == approx(k / n, abs=0.03)  # 4000 draws: std <= 0.008
  assert runs[0]["chance_r_mean"] == approx((1 + 5 + 10) / 3 / 20)


# --- ITM re-ranking ---------------------------------------------------------------------------

SIM = np.array([[0.2, 0.5, 0.4, 0.1],   # correct 0 at ITC rank 3 of 4 (1-based)
                [0.1, 0.9, 0.3, 0.2],   # correct 1 first
                [0.6, 0.5, 0.1, 0.7],   # correct 2 last: outside a top 3
                [0.3, 0.2, 0.1, 0.8]])  # correct 3 first
ITM = np.array([[2.0, 0.0, 0.0, 5.0],
                [0.0, 1.0, 0.0, 0.0],
                [0.0, 0.0, 9.0, 0.0],
                [0.5, 0.0, 0.0, -1.0]])


def _fake_pairs(table, calls):
  def score_pairs(queries, candidates):
    calls.extend(zip(queries.tolist(), candidates.tolist()))
    return table[queries, candidates]
  return score_pairs


def test_rerank_scores_only_top_k():
  calls = []
  out = retrieval.rerank(SIM, 3, _fake_pairs(ITM, calls))
  inf = -np.inf
  # Top 3 by ITC: q0 {1, 2, 0}, q1 {1, 2, 3}, q2 {3, 0, 1}, q3 {3, 0, 1}; score = ITM + ITC.
  expected = np.array([[2.0 + 0.2, 0.0 + 0.5, 0.0 + 0.4, inf],
                       [inf, 1.0 + 0.9, 0.0 + 0.3, 0.0 + 0.2],
                       [0.0 + 0.6, 0.0 + 0.5, inf, 0.0 + 0.7],
                       [0.5 + 0.3, 0.0 + 0.2, inf, -1.0 + 0.8]])
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  assert sorted(calls) == sorted([(0, 1), (0, 2), (0, 0), (1, 1), (1, 2), (1, 3),
                                  (2, 3), (2, 0), (2, 1), (3, 3), (3, 0), (3, 1)])
  # Ranks after re-ranking: q0 2.2 best -> 0 (ITM lifts it from rank 2); q1 -> 0;
  # q2 -inf below 3 finite -> 3; q3 -0.2 < 0.8, 0.2 -> 2.
  rec = metrics.recall_at_k(out, ks=(1, 2, 3))
  assert [rec[f"i2t_r{k}"] for k in (1, 2, 3)] == approx([2 / 4, 2 / 4, 3 / 4])
  itc = metrics.recall_at_k(SIM, ks=(1,))
  assert itc["i2t_r1"] == approx(2 / 4)  # ITC: q1, q3 first; q0 at rank 2


def test_rerank_k_at_least_n_scores_everything():
  out = retrieval.rerank(SIM, 10, _fake_pairs(ITM, []))
  np.testing.assert_allclose(out, SIM + ITM, rtol=1e-6)
  # Every pair is scored now: q0 [2.2, .5, .4, 5.1] -> rank 1 (q0's ITM 5.0 on item 3 is seen);
  # q1 1.9 best -> 0; q2 [.6, .5, 9.1, .7] -> 0; q3 [.8, .2, .1, -.2] -> 3.
  rec = metrics.recall_at_k(out, ks=(1, 2, 3, 4))
  assert [rec[f"i2t_r{k}"] for k in (1, 2, 3, 4)] == approx([2 / 4, 3 / 4, 3 / 4, 1.0])


def test_rerank_cannot_recover_items_outside_top_k():
  rng = np.random.default_rng(5)
  n = 8
  sim = rng.uniform(0, 1, (n, n))
  itm = np.full((n, n), -10.0)
  np.fill_diagonal(itm, 100.0)  # the ITM head always knows the answer
  for k in (1, 2, 3):
    out = retrieval.rerank(sim, k, _fake_pairs(itm, []))
    # R@1 after re-ranking = fraction of queries whose correct item is in the ITC top k.
    itc_rank = (sim > np.diag(sim)[:, None]).sum(axis=1)
    assert metrics.recall_at_k(out, ks=(1,))["i2t_r1"] == approx(np.mean(itc_rank < k))
    assert np.isfinite(out).sum(axis=1).tolist() == [k] * n


def test_rerank_unranked_correct_item_is_not_a_hit_at_larger_k():
  n = 12
  sim = np.tile(np.arange(n, 0, -1.0), (n, 1))  # every query ranks candidates 0, 1, 2, ...
  sim[np.arange(n), np.arange(n)] = -1.0  # ... and its own correct item last
  out = retrieval.rerank(sim, 2, lambda q, c: np.zeros(len(q)))
  rec = metrics.recall_at_k(out)
  # ITC ranks every correct item last (rank 11); re-ranking only saw 2 wrong candidates per
  # query, so the correct item is not in any top 5 or top 10: R@5 = R@10 = 0.
  assert rec["i2t_r5"] == 0.0
  assert rec["i2t_r10"] == 0.0


# --- classification ---------------------------------------------------------------------------

def test_classification_hand_example():
  truth = np.array([0, 0, 0, 1, 1, 2])
  pred = np.array([0, 3, 1, 1, 0, 2])
  train = np.array([1, 1, 2, 2, 0])  # 1 and 2 tie (2 each): majority is the smaller, 1
  out = metrics.classification(pred, truth, train, num_classes=4)
  assert out["accuracy"] == approx(3 / 6)  # hits at 0, 3, 5
  # Per-class recall: class 0 1/3, class 1 1/2, class 2 1/1 -> mean 11/18.
  assert out["balanced_accuracy"] == approx((1 / 3 + 1 / 2 + 1) / 3)
  assert out["chance_accuracy"] == approx(2 / 6)  # always 1: truth has two 1s
  assert out["chance_balanced_accuracy"] == approx((0 + 1 + 0) / 3)
  assert out["num_examples"] == 6
  assert out["confusion"] == [[1, 1, 0, 1],  # true 0: predicted 0, 3, 1
                              [1, 1, 0, 0],  # true 1: predicted 1, 0
                              [0, 0, 1, 0],
                              [0, 0, 0, 0]]


def test_majority_label_ties_to_smallest():
  assert metrics.majority_label(np.array([3, 1, 3, 1, 2])) == 1
  assert metrics.majority_label(np.array([4, 4, 0])) == 4


def test_confusion_layout_is_true_by_pred():
  # One example of true 2 predicted 0: row 2, column 0.
  assert metrics.confusion(np.array([0]), np.array([2]), 3) == [[0, 0, 0], [0, 0, 0], [1, 0, 0]]


# --- mIoU -------------------------------------------------------------------------------------

def test_mean_iou_hand_example():
  truth = np.array([0, 0, 1, 1, 2, 2])
  pred = np.array([0, 1, 1, 1, 2, 0])
  # class 0: I {0} = 1, U {0, 1, 5} = 3 -> 1/3; class 1: I {2, 3}, U {1, 2, 3} -> 2/3;
  # class 2: I {4}, U {4, 5} -> 1/2. Class 3 is absent from both and ignored.
  assert metrics.mean_iou(pred, truth, 4) == approx((1 / 3 + 2 / 3 + 1 / 2) / 3)  # = 0.5
  # 2D input is flattened.
  assert metrics.mean_iou(pred.reshape(2, 3), truth.reshape(2, 3), 4) == approx(0.5)


def test_mean_iou_class_only_predicted_counts_zero():
  # class 0: I 1, U 2 -> 1/2; class 3 (predicted, not true): I 0 -> 0.
  assert metrics.mean_iou(np.array([0, 3]), np.array([0, 0]), 4) == approx(0.25)


def test_mean_iou_perfect():
  labels = np.array([[0, 5, 5], [2, 2, 0]])
  assert metrics.mean_iou(labels, labels, 6) == 1.0


# --- multilabel -------------------------------------------------------------------------------

def test_multilabel_hand_example():
  truth = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
  pred = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 0, 1]])
  train = np.array([[1, 0, 1], [0, 0, 1], [0, 0, 1], [1, 1, 0]])  # most frequent: [0, 0, 1]
  out = metrics.multilabel(pred, truth, train)
  assert out["exact_match"] == approx(2 / 4)  # rows 0 and 3
  # TP = 2 + 0 + 2 + 1 = 5, FP = 1 (row 2 col 2), FN = 1 (row 1 col 1): F1 = 10 / 12.
  assert out["f1"] == approx(2 * 5 / (2 * 5 + 1 + 1))
  assert out["chance_exact_match"] == approx(1 / 4)  # only row 3 is [0, 0, 1]
  p = 6 / 12  # positive rate of the test truth
  assert out["chance_f1"] == approx(2 * p / (1 + p))  # = 2/3
  assert out["num_examples"] == 4


def test_multilabel_perfect_and_all_wrong():
  truth = np.array([[1, 0], [0, 1], [1, 1]])
  out = metrics.multilabel(truth, truth, truth)
  assert out["exact_match"] == 1.0 and out["f1"] == 1.0
  out = metrics.multilabel(1 - truth, truth, truth)
  # Pred [[0,1],[1,0],[0,0]]: TP 0 -> F1 0; no row matches.
  assert out["exact_match"] == 0.0 and out["f1"] == 0.0
  p = 4 / 6
  assert out["chance_f1"] == approx(2 * p / (1 + p))


# --- captions ---------------------------------------------------------------------------------

def test_words_tokenisation():
  assert metrics.words("The Targets, ARE located: upper-left$centre.") == \
      "the targets are located upper left $ centre"
  assert metrics.words("  $  ") == "$"
  assert metrics.words("!?.,;") == ""


def test_caption_identical_is_bleu_one():
  out = metrics.caption_scores(["The cargo ships sit in the harbour."],
                               [["the cargo ships sit in the harbour"]])
  assert out["bleu4"] == approx(1.0, abs=1e-6)


def test_caption_bleu_hand_partial():
  # Hypothesis a b c d e vs reference a b c d f: n-gram precisions 4/5, 3/4, 2/3, 1/2, equal
  # lengths (brevity penalty 1): BLEU-4 = (4/5 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.2 ** 0.25.
  out = metrics.caption_scores(["a b c d e"], [["a b c d f"]])
  assert out["bleu4"] == approx(0.2 ** 0.25, rel=1e-6)


def test_caption_no_shared_words_scores_zero():
  refs = [["the ships are in the harbour"], ["water covers the upper left"], ["roads cross the fields"]]
  out = metrics.caption_scores(["dog cat bird fish", "one two three four", "red green blue black"], refs)
  assert out["bleu4"] < 1e-6
  assert out["cider"] == 0.0


def test_cider_ordering_and_perfect_value():
  refs = [["alpha beta gamma delta epsilon"], ["one two three four five"], ["red green blue black white"]]
  perfect = metrics.caption_scores([r[0] for r in refs], refs)
  partial = metrics.caption_scores(["alpha beta gamma delta zeta", "one two three four five",
                                    "red green cyan magenta white"], refs)
  none = metrics.caption_scores(["x y z w v", "p q r s t", "k l m n o"], refs)
  # Perfect, with disjoint vocabularies: every n-gram has df 1 of 3 images (idf log 3 > 0), the
  # hypothesis vector equals the reference's (cosine 1), equal lengths (penalty e^0 = 1): each
  # n gives 1, averaged over n = 1..4 and scaled by 10 -> 10 per image.
  assert perfect["cider"] == approx(10.0, rel=1e-6)
  assert perfect["cider"] > partial["cider"] > none["cider"] == 0.0
  assert perfect["bleu4"] > partial["bleu4"] > none["bleu4"]


# --- answer ranking ---------------------------------------------------------------------------

def test_answer_ranking_hand_example():
  scores = np.array([[0.1, 0.9, 0.0],   # -> 1, truth 1: hit
                     [0.5, 0.2, 0.3],   # -> 0, truth 0: hit
                     [0.6, 0.4, 0.1],   # -> 0, truth 2: miss
                     [0.0, 0.1, 0.2]])  # -> 2, truth -1 (not a candidate): always a miss
  answers = np.array([1, 0, 2, -1])
  train = np.array([2, 2, 0, -1, -1, -1])  # -1 is most frequent but no answer; majority 2
  out = metrics.answer_ranking(scores, answers, train)
  assert out["accuracy"] == approx(2 / 4)
  assert out["chance_accuracy"] == approx(1 / 4)  # only question 2's answer is 2
  assert out["chance_uniform"] == approx(3 / 4 * 1 / 3)  # 1 in 3 on the 3 answerable questions
  assert out["num_questions"] == 4 and out["num_candidates"] == 3


def test_answer_ranking_unknown_answers_never_correct():
  scores = np.zeros((3, 2))
  out = metrics.answer_ranking(scores, np.array([-1, -1, -1]), np.array([0, 1, 1]))
  assert out["accuracy"] == 0.0
  assert out["chance_accuracy"] == 0.0  # majority 1 never the answer
  assert out["chance_uniform"] == 0.0  # no guess can be right


def test_answer_ranking_chance_without_known_train_answers():
  out = metrics.answer_ranking(np.zeros((2, 2)), np.array([-1, -1]), np.array([-1, -1]))
  assert out["chance_accuracy"] == 0.0
