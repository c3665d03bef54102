"""Screening AUC from hand-built relabel entries, against AUCs counted by hand: only real variants
(clause k of a caption with 2+ clauses) count; the ROC AUC helper on a tiny case."""

import math

import numpy as np
import pytest

from klip_jax.eval import metrics, screening
from klip_jax.eval.truth import NoTruth

approx = pytest.approx
BIG = 100.0  # a meaningless score in a slot no clause fills: counted, it would change every AUC


def _entry(caption, itc, itm, flagged, truth):
  return {"caption": caption, "itc": itc, "itm": itm, "flagged": flagged, "truth": truth}


# Tables of 1 + 4 slots (max_clauses 4); scores are multiples of 1/8, so the gains are exact.
ENTRIES = [
    # 3 clauses, clause 0 corrupted and flagged; slot 3 is past the caption's clauses.
    _entry("a$b$c", [0.5, 0.75, 0.25, 0.625, BIG], [0.5, 0.875, 0.25, 0.375, BIG], 0, {"0": "x"}),
    # 2 clauses, clause 1 corrupted, nothing flagged.
    _entry("d$e", [0.25, 0.125, 0.375, BIG, BIG], [0.5, 0.75, 0.375, BIG, BIG], -1, {"1": "y"}),
    # 1 clause: never screened, although corrupted and with a huge gain.
    _entry("f", [0.0, BIG, BIG, BIG, BIG], [0.0, BIG, BIG, BIG, BIG], -1, {"0": "w"}),
]
# Screened clauses (itc gain, itm gain, rule = min, flagged):
#   A0 corrupted: +0.25,  +0.375, +0.25,  1
#   A1 clean:     -0.25,  -0.25,  -0.25,  0
#   A2 clean:     +0.125, -0.125, -0.125, 0
#   B0 clean:     -0.125, +0.25,  -0.125, 0
#   B1 corrupted: +0.125, -0.125, -0.125, 0
# 2 corrupted x 3 clean = 6 pairs; a win counts 1, a tie 1/2.
#   itc:     A0 beats all 3 (3); B1 beats A1, B0, ties A2 (2.5)          -> 5.5 / 6 = 11/12
#   itm:     A0 beats all 3 (3); B1 beats A1, ties A2, loses to B0 (1.5) -> 4.5 / 6 = 3/4
#   rule:    A0 beats all 3 (3); B1 beats A1, ties A2 and B0 (2)         -> 5 / 6
#   flagged: A0 beats all 3 (3); B1 ties all 3 (1.5)                     -> 4.5 / 6 = 3/4


def test_roc_auc_hand_case():
  # Positives 0.35, 0.8 vs negatives 0.1, 0.4: 0.35 beats 0.1 only; 0.8 beats both -> 3 / 4.
  assert metrics.roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == approx(0.75)
  # Ties count half: 0.5 vs 0.5 -> 1/2.
  assert metrics.roc_auc(np.array([0.5, 0.5]), np.array([1, 0])) == approx(0.5)
  # Infinite scores rank too: -inf vs -inf ties (1/2), 0.3 beats both -inf -> (1/2 + 1) / 2.
  assert metrics.roc_auc(np.array([-np.inf, 0.3, -np.inf]), np.array([1, 1, 0])) == approx(0.75)
  assert math.isnan(metrics.roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))
  assert math.isnan(metrics.roc_auc(np.array([0.1, 0.2]), np.array([0, 0])))


def test_binary_accuracy_hand_case():
  # Predictions (> 0.5): 1, 0, 0, 1, 0 vs labels 1, 1, 0, 0, 0: right on items 0, 2, 4 -> 3/5.
  # Recall of label 1: 1/2; of label 0: 2/3 -> balanced (1/2 + 2/3) / 2 = 7/12. Majority: 3/5.
  out = metrics.binary_accuracy(np.array([0.9, 0.2, 0.5, 0.7, 0.1]), np.array([1, 1, 0, 0, 0]), 0.5)
  assert out["accuracy"] == approx(3 / 5)
  assert out["balanced_accuracy"] == approx(7 / 12)
  assert out["chance_accuracy"] == approx(3 / 5)
  assert out["chance_balanced_accuracy"] == 0.5


def test_clause_table_rows():
  table = screening.clause_table(ENTRIES)
  np.testing.assert_array_equal(table["caption"], [0, 0, 0, 1, 1])
  np.testing.assert_array_equal(table["clause"], [0, 1, 2, 0, 1])
  np.testing.assert_array_equal(table["corrupted"], [True, False, False, False, True])
  np.testing.assert_array_equal(table["itc_gain"], [0.25, -0.25, 0.125, -0.125, 0.125])
  np.testing.assert_array_equal(table["itm_gain"], [0.375, -0.25, -0.125, 0.25, -0.125])
  np.testing.assert_array_equal(table["rule"], [0.25, -0.25, -0.125, -0.125, -0.125])
  np.testing.assert_array_equal(table["flagged"], [1, 0, 0, 0, 0])
  several = [{**ENTRIES[0], "flagged": [2, 0]}, {**ENTRIES[1], "flagged": []}]
  np.testing.assert_array_equal(screening.clause_table(several)["flagged"], [1, 0, 1, 0, 0])


def test_screening_aucs_by_hand():
  out = screening.evaluate(ENTRIES)
  assert out["auc_itc"] == approx(11 / 12)
  assert out["auc_itm"] == approx(3 / 4)
  assert out["auc_rule"] == approx(5 / 6)
  assert out["auc_flagged"] == approx(3 / 4)
  assert out["chance_auc"] == 0.5
  assert out["corrupted_rate"] == approx(2 / 5)
  assert out["clauses"] == 5


def test_perfect_and_inverted_signals():
  # Removing the corrupted clause 1 raises both scores; removing clean 0 or 2 lowers both.
  good = _entry("a$b$c", [0.5, 0.25, 0.75, 0.375], [0.5, 0.25, 0.875, 0.375], 1, {"1": "x"})
  out = screening.evaluate([good])
  assert (out["auc_itc"], out["auc_itm"], out["auc_rule"], out["auc_flagged"]) == (1.0, 1.0, 1.0, 1.0)
  # The same gains with the truth on clause 0: itc gains -0.25, +0.25, -0.125, itm gains -0.25,
  # +0.375, -0.125, rule -0.25, +0.25, -0.125: the corrupted clause is below both clean ones.
  bad = _entry("a$b$c", [0.5, 0.25, 0.75, 0.375], [0.5, 0.25, 0.875, 0.375], 1, {"0": "x"})
  out = screening.evaluate([bad])
  assert (out["auc_itc"], out["auc_itm"], out["auc_rule"]) == (0.0, 0.0, 0.0)
  assert out["auc_flagged"] == 0.25  # corrupted 0 vs clean {1, 0}: loses once, ties once -> 1/4


def test_no_truth_cases():
  clean = _entry("a$b", [0.5, 0.25, 0.75], [0.5, 0.25, 0.75], -1, {})
  with pytest.raises(NoTruth):
    screening.evaluate([clean])  # nothing corrupted
  with pytest.raises(NoTruth):
    screening.evaluate([_entry("a$b", [0.5, 0.25, 0.75], [0.5, 0.25, 0.75], -1, {"0": "x", "1": "y"})])
  with pytest.raises(NoTruth):  # the only corrupted clause is a caption's only clause
    screening.evaluate([clean, _entry("f", [0.0, 1.0, 1.0], [0.0, 1.0, 1.0], -1, {"0": "w"})])
  with pytest.raises(NoTruth):
    screening.evaluate([])


def test_per_field_aucs_and_the_image_blind_field_apart():
  # Two target captions of 8 clauses (count, location, feature, size, category, distribution,
  # region, environment); ITC = ITM tables, so every gain is the rule's value.
  def target(gains, truth):
    table = [0.0, *gains]
    return {**_entry("$".join("abcdefgh"), table, table, -1, truth), "scene_type": "target"}
  entries = [target([0.5, 0, 0, 0, 0, 0, -0.5, 0], {"0": "9", "6": "oslo, norway"}),
             target([0.25, 0, 0, 0, 0, 0, 0.5, 0], {})]
  out = screening.evaluate(entries)
  fields = out["per_field"]
  assert len(fields) == 8 and fields["target.count"]["clauses"] == 2
  assert fields["target.count"]["auc_rule"] == approx(1.0)  # corrupted 0.5 over clean 0.25
  assert fields["target.region"]["auc_rule"] == approx(0.0)  # corrupted -0.5 under clean 0.5
  assert math.isnan(fields["target.size"]["auc_rule"])  # no corrupted size clause
  # Visible: count 0.5 (corrupted) above all 13 clean clauses. Image-blind: region alone.
  assert out["auc_rule_visible"] == approx(1.0)
  assert out["auc_rule_image_blind"] == approx(0.0)
  # All 16: 0.5 beats 13 clean and ties 0.5 (13.5); -0.5 beats none -> 13.5 / (2 x 14).
  assert out["auc_rule"] == approx(13.5 / 28)


def test_the_rule_column_is_the_relabel_rules_own_score_when_entries_carry_it():
  # The same gains, scored by another rule (e.g. the relative one): its scores, not min(gains).
  scored = [dict(ENTRIES[0], score=[-1.0, 2.0, 0.5, BIG]), dict(ENTRIES[1], score=[0.0, 3.0, BIG, BIG]), ENTRIES[2]]
  table = screening.clause_table(scored)
  np.testing.assert_array_equal(table["rule"], [-1.0, 2.0, 0.5, 0.0, 3.0])
  # Corrupted A0 (-1) and B1 (3) against clean A1 (2), A2 (0.5), B0 (0): B1 wins 3, A0 none -> 3/6.
  assert screening.evaluate(scored)["auc_rule"] == approx(1 / 2)
  assert screening.evaluate(scored)["auc_itc"] == approx(11 / 12)  # the gains are unchanged


def test_the_decoder_signal_is_the_entries_keyword_surprise_and_absent_from_older_entries():
  # Surprise per clause (slots past a caption's clauses hold BIG and must not count):
  #   A0 corrupted 3.0, A1 clean 1.0, A2 clean 2.5 | B0 clean 3.0, B1 corrupted 2.0.
  # A0 beats A1, A2, ties B0 (2.5); B1 beats A1 only (1) -> 3.5 / 6.
  with_surprise = [dict(ENTRIES[0], surprise=[3.0, 1.0, 2.5, BIG]), dict(ENTRIES[1], surprise=[3.0, 2.0, BIG, BIG]),
                   dict(ENTRIES[2], surprise=[BIG, BIG, BIG, BIG])]
  np.testing.assert_array_equal(screening.clause_table(with_surprise)["surprise"], [3.0, 1.0, 2.5, 3.0, 2.0])
  assert screening.evaluate(with_surprise)["auc_decoder"] == approx(3.5 / 6)
  # Overlays written before screening recorded the decoder's surprise: no decoder AUC, the rest as before.
  out = screening.evaluate(ENTRIES)
  assert "auc_decoder" not in out and out["auc_itc"] == approx(11 / 12)


def test_a_clause_cut_off_by_the_tokenizer_is_left_out_of_every_signal():
  # data.max_len cut caption A inside clause 2: the relabel step found no tokens of it and
  # recorded NaN for its score and surprise. The table holds A0, A1, B0, B1, whose rule scores
  # are -1 (corrupted), 2 | 0, 3 (corrupted): B1 beats both clean ones, A0 neither -> 2/4.
  cut = [dict(ENTRIES[0], score=[-1.0, 2.0, math.nan, BIG], surprise=[3.0, 1.0, math.nan, BIG]),
         dict(ENTRIES[1], score=[0.0, 3.0, BIG, BIG], surprise=[3.0, 2.0, BIG, BIG])]
  table = screening.clause_table(cut)
  np.testing.assert_array_equal(table["clause"], [0, 1, 0, 1])
  np.testing.assert_array_equal(table["itc_gain"], [0.25, -0.25, -0.125, 0.125])
  out = screening.evaluate(cut)
  assert out["clauses"] == 4 and out["auc_rule"] == approx(2 / 4)
  # Surprise: corrupted A0 3.0 and B1 2.0 against clean A1 1.0, B0 3.0: A0 wins 1, ties 1; B1 wins 1 -> 2.5/4.
  assert out["auc_decoder"] == approx(2.5 / 4)
