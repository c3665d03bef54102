"""VQA by answer ranking and the true text of a chip: clause masks with the real tokenizer,
answer extraction, keyword restoration, and evaluate() with a fake decoder whose favourite
answer is known."""

import numpy as np
import pytest

from klip_jax.data import knowledge
from klip_jax.data.records import true_text
from klip_jax.data.tokenizer import TextCodec
from klip_jax.eval import vqa
from klip_jax.eval.truth import NoTruth, Split

TARGET = ["3", "upper left", "north-south", "120", "cargo ships", "isolated",
          "rotterdam, netherlands", "open sea"]
LANDFORM = ["hilly area", "agricultural production", "water mainly in the upper left",
            "a regular street grid", "water and vegetation", "densely built",
            "sparse with a few straight roads", "a winding river"]


@pytest.fixture(scope="module")
def codec(tiny_tokenizer):
  return TextCodec(tiny_tokenizer, 96)


def _target(count="3"):
  return ("target", [count] + TARGET[1:])


def _landform(distribution):
  return ("landform", LANDFORM[:2] + [distribution] + LANDFORM[3:])


def _split(chips):
  """A Split of (scene_type, true keywords) chips; the records' own keywords are deliberately
  wrong (the split's true keywords are what questions read)."""
  records = [{"scene_type": s, "field_names": list(knowledge.FIELDS[s]), "keywords": ["wrong"] * 8}
             for s, _ in chips]
  n = len(chips)
  return Split(name="synthetic", records=records, images=np.zeros((n, 8, 8, 1), np.float32),
               keywords=[list(k) for _, k in chips], captions=[""] * n, text_ids=np.zeros((n, 4), np.int32))


# --- clauses ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, keyword, next_words", [
    # The word after {} in each template ("$" closes a clause that ends with the keyword).
    ("vqa_count", "3", ["in", "targets", "of"]),
    ("vqa_recognition", "cargo ships", ["$", "$", "$"]),
    ("vqa_position", "upper left and centre", ["of", "part", "cells"]),
    ("vqa_region_landform", "bare land mainly in the upper left", ["$", "$", "$"]),
])
def test_clauses_mark_keyword_and_next_token(codec, name, keyword, next_words):
  question = vqa.QUESTIONS[name]
  templates = knowledge.TEMPLATES[question.scene_type][question.field]
  ids, scored = vqa._clauses(codec, question, keyword)
  assert ids.shape == (3, 96) and scored.shape == (3, 95)
  for t, template in enumerate(templates):
    assert codec.decode(ids[t]) == template.format(keyword) + "$"
    positions = np.flatnonzero(scored[t]) + 1  # prediction p scores token p + 1
    assert np.all(np.diff(positions) == 1)  # one contiguous run
    marked = ids[t][positions]
    assert codec.decode(marked[:-1]) == keyword  # exactly the keyword's tokens ...
    assert codec.decode(marked[-1:]) == next_words[t]  # ... plus the one after it
    nxt = positions[-1] + 1
    assert ids[t][nxt] != codec.pad_id  # more follows ("$" or [SEP]) and is not scored


def test_clauses_tell_prefix_keywords_apart(codec):
  question = vqa.QUESTIONS["vqa_position"]
  short, short_mask = vqa._clauses(codec, question, "upper left")
  long, long_mask = vqa._clauses(codec, question, "upper left and centre")
  # "upper left" is scored with the token after it ("of"), which "upper left and centre" lacks
  # at that position ("and").
  first = np.flatnonzero(short_mask[0]) + 1
  assert codec.decode(short[0][first]) == "upper left of"
  assert codec.decode(long[0][first]) == "upper left and"
  assert short_mask[0].sum() < long_mask[0].sum()


# --- answers ----------------------------------------------------------------------------------

def test_answers_per_question():
  split = _split([_landform("bare land mainly in the upper left"), _landform("uniform water"),
                  _target("7"), _landform("water mainly in the centre"), _target("12")])
  assert vqa._answers(vqa.QUESTIONS["vqa_region_landform"], split) == [
      (0, "bare land", "upper left"), (3, "water", "centre")]  # "uniform water" names no region
  assert vqa._answers(vqa.QUESTIONS["vqa_count"], split) == [(2, "7", ""), (4, "12", "")]
  assert vqa._answers(vqa.QUESTIONS["vqa_recognition"], split) == [(2, "cargo ships", ""),
                                                                   (4, "cargo ships", "")]
  assert vqa._answers(vqa.QUESTIONS["vqa_landform"], split) == [
      (i, "hilly area", "") for i in (0, 1, 3)]
  region = vqa.QUESTIONS["vqa_region_landform"]
  assert region.keyword_of("roads", "lower right") == "roads mainly in the lower right"


# --- true text --------------------------------------------------------------------------------

def test_true_text_restores_corrupted_keywords():
  true = ["3", "upper left and centre", "north-south", "120", "cargo ships", "arranged in a row",
          "rotterdam, netherlands", "a coastal harbour"]
  noisy = ["5"] + true[1:4] + ["tankers"] + true[5:]
  caption, spans = knowledge.verbalise("target", noisy, [0] * 8)
  record = {"keywords": noisy, "caption": caption, "spans": np.asarray(spans, np.int32),
            "truth": {"corrupted": np.asarray([0, 4], np.int32), "true_keywords": ["3", "cargo ships"]}}
  keywords, text, new_spans = true_text(record)
  assert keywords == true
  assert text == ("the number of targets is 3 in total"
                  "$the targets are located in the upper left and centre of the image"
                  "$the targets show strong point scattering with cross sidelobes oriented north-south"
                  "$the largest target is about 120 metres long"
                  "$the targets are identified as cargo ships"
                  "$the targets are arranged in a row"
                  "$the scene lies near rotterdam, netherlands"
                  "$the targets are situated in a coastal harbour")
  assert [text[a:b] for a, b in new_spans] == true
  # "tankers" -> "cargo ships" is 4 characters longer: later spans shift by 4.
  assert [int(a) for a, _ in new_spans[5:]] == [a + 4 for a, _ in spans[5:]]
  # The record itself is left as it was.
  assert record["keywords"] == noisy and record["caption"] == caption


def test_true_text_without_corruption_is_unchanged():
  caption, spans = knowledge.verbalise("target", TARGET, [1] * 8)
  for truth in ({}, {"corrupted": np.zeros(0, np.int32), "true_keywords": []}):
    record = {"keywords": list(TARGET), "caption": caption, "spans": np.asarray(spans, np.int32)}
    if truth:
      record["truth"] = truth
    keywords, text, new_spans = true_text(record)
    assert keywords == TARGET and text == caption
    assert [tuple(map(int, s)) for s in new_spans] == spans


# --- evaluate with a fake decoder -------------------------------------------------------------

class FakeRunner:
  """token_logprobs: 0 at every position of a row that spells `favour[chip]` in one of the
  question's templates, -5 elsewhere; the chip is read from its image token."""

  def __init__(self, codec, question, favour):
    self.codec, self.favour = codec, favour
    self.templates = knowledge.TEMPLATES[question.scene_type][question.field]
    self.rows = 0

  def token_logprobs(self, image_tokens, ids, rows):
    image_tokens = image_tokens[rows]
    out = np.full((len(ids), ids.shape[1] - 1), -5.0, np.float32)
    for r in range(len(ids)):
      keyword = self.favour[int(image_tokens[r, 0, 0])]
      if self.codec.decode(ids[r]) in {t.format(keyword) + "$" for t in self.templates}:
        out[r] = 0.0
    self.rows += len(ids)
    return out


def _tokens(split):
  return np.arange(len(split), dtype=np.float32)[:, None, None]  # image token = chip index


COUNT_TRAIN = [_target(c) for c in ("1", "2", "1", "3", "2", "1")] + [_landform("uniform water")]
COUNT_TEST = [_target("2"), _landform("uniform water"), _target("3"), _target("1"), _target("4")]


def _evaluate(codec, name, train, test, favour, **kwargs):
  kwargs = {"max_questions": 100, "max_candidates": 10, **kwargs}
  runner = FakeRunner(codec, vqa.QUESTIONS[name], favour)
  out = vqa.evaluate(name, runner, codec, test, _tokens(test), train, **kwargs)
  return out, runner


def test_evaluate_count_fake_favours_truth(codec):
  train, test = _split(COUNT_TRAIN), _split(COUNT_TEST)
  favour = {i: k[0] for i, (_, k) in enumerate(COUNT_TEST)}
  out, runner = _evaluate(codec, "vqa_count", train, test, favour)
  # Candidates by train frequency: "1" (3), "2" (2), "3" (1). Test chips 0, 2, 3, 4 are asked
  # (chip 1 is a landform); "4" was never a train answer, so it is wrong whatever the scores.
  assert out["num_questions"] == 4 and out["num_candidates"] == 3
  assert out["accuracy"] == pytest.approx(3 / 4)
  assert out["chance_accuracy"] == pytest.approx(1 / 4)  # always "1": right for chip 3 only
  assert out["chance_uniform"] == pytest.approx(3 / 4 * 1 / 3)  # chip 4's "4" is no candidate
  assert out["question"] == vqa.QUESTIONS["vqa_count"].text
  assert runner.rows == 4 * 3 * 3  # questions x candidates x templates


def test_evaluate_count_fake_favours_a_wrong_candidate(codec):
  train, test = _split(COUNT_TRAIN), _split(COUNT_TEST)
  # The first candidate in ("1", "2", "3") that is not the truth.
  favour = {0: "1", 2: "1", 3: "2", 4: "1"}
  out, _ = _evaluate(codec, "vqa_count", train, test, favour)
  assert out["accuracy"] == 0.0
  assert out["chance_accuracy"] == pytest.approx(1 / 4)


def test_evaluate_limits_questions_and_candidates(codec):
  train, test = _split(COUNT_TRAIN), _split(COUNT_TEST)
  favour = {i: k[0] for i, (_, k) in enumerate(COUNT_TEST)}
  out, runner = _evaluate(codec, "vqa_count", train, test, favour, max_questions=2)
  assert out["num_questions"] == 2 and out["accuracy"] == 1.0  # chips 0 ("2") and 2 ("3")
  assert runner.rows == 2 * 3 * 3
  out, _ = _evaluate(codec, "vqa_count", train, test, favour, max_candidates=2)
  # Candidates "1", "2": the truths "3" and "4" are not among them -> 2 of 4 right.
  assert out["num_candidates"] == 2 and out["accuracy"] == pytest.approx(2 / 4)
  assert out["chance_uniform"] == pytest.approx(2 / 4 * 1 / 2)


def test_evaluate_region_question_uses_the_cell(codec):
  train = _split([_landform("water mainly in the upper left"), _landform("water mainly in the centre"),
                  _landform("bare land mainly in the lower right"), _landform("uniform water"),
                  _target("2")])
  test_chips = [_landform("bare land mainly in the upper left"), _landform("uniform vegetation"),
                _landform("water mainly in the lower middle"), _landform("roads mainly in the centre")]
  test = _split(test_chips)
  favour = {i: k[2] for i, (_, k) in enumerate(test_chips)}  # the true keyword, cell included
  out, _ = _evaluate(codec, "vqa_region_landform", train, test, favour)
  # Candidates "water" (2), "bare land" (1); chip 1 names no region; "roads" is unseen.
  assert out["num_questions"] == 3 and out["num_candidates"] == 2
  assert out["accuracy"] == pytest.approx(2 / 3)
  assert out["chance_accuracy"] == pytest.approx(1 / 3)  # always "water": chip 2
  wrong = {0: "water mainly in the upper left", 2: "bare land mainly in the lower middle",
           3: "water mainly in the centre"}
  out, _ = _evaluate(codec, "vqa_region_landform", train, test, wrong)
  assert out["accuracy"] == 0.0


def test_evaluate_raises_without_questions(codec):
  landforms = _split([_landform("uniform water")] * 3)
  targets = _split(COUNT_TRAIN)
  with pytest.raises(NoTruth):
    _evaluate(codec, "vqa_count", targets, landforms, {})
  with pytest.raises(NoTruth):
    _evaluate(codec, "vqa_count", landforms, targets, {})
  with pytest.raises(NoTruth):  # no landform names a region
    _evaluate(codec, "vqa_region_landform", landforms, landforms, {})
