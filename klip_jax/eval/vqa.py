"""Visual question answering by answer ranking, zero-shot from pretraining (BLIP's rank-answer).

Each question type is answered by one HCoT field: the question is posed as that field's
clause, and every candidate answer is scored by the image-grounded decoder's log-likelihood
of the candidate in the keyword slot: summed over the keyword's tokens and the one token that
ends it (so "upper left" and "upper left and centre" are told apart), given the clause
before it, averaged over the field's templates. Pretraining taught the decoder exactly these
keyword predictions (masked-keyword reconstruction). The highest-scoring candidate is the
answer. Candidates are the answers seen in the train split (the usual VQA answer vocabulary),
so a test answer never seen in training counts as wrong.

Answers are read from the true keyword in a form that also fits free text (real LLM-written
fields): a count is the keyword's first number ("three ships" -> "3"), a position the 3x3
cells it names (top/bottom/center read as upper/lower/centre), a recognition the target class
it names, the land covers present the covers it names (river, farmland, urban, ... read as
water, vegetation, buildings, ...); the synthetic world's keywords read as themselves. A chip
whose keyword gives no answer is not asked. Questions whose answers are the keyword itself
(main landform) or a free part of it (the region's land cover) are skipped when the test
answers do not recur among the train answers (MIN_COVERAGE): on free text, ranking answers
nobody else gave measures nothing. Every skip says which of these it was.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable

import numpy as np

from klip_jax.data import fields, knowledge, targets
from klip_jax.data.tokenizer import TextCodec
from klip_jax.eval import metrics
from klip_jax.eval.runner import ModelRunner
from klip_jax.eval.truth import NoTruth, Split

_REGION_SEP = " mainly in the "
MIN_COVERAGE = 0.5  # share of test answers among the candidates below which free-form answers are skipped


@dataclasses.dataclass(frozen=True)
class Question:
  """A question type: its words, the field whose clause answers it, and how a chip's true
  keyword gives (answer, context) and (candidate answer, context) gives the keyword. `reads`
  says what answer_of looks for (for skip reasons); `closed`: it maps keywords into a closed
  answer set (else the answers are checked for recurring, MIN_COVERAGE)."""

  text: str
  scene_type: str
  field: str
  answer_of: Callable[[str], tuple[str, str] | None] = lambda keyword: (keyword, "")
  keyword_of: Callable[[str, str], str] = lambda answer, context: answer
  reads: str = "its keyword"
  closed: bool = False


def _region(keyword: str) -> tuple[str, str] | None:
  cover, sep, cell = keyword.partition(_REGION_SEP)
  return (cover, cell) if sep else None  # "uniform ..." names no region


def _count(keyword: str) -> tuple[str, str] | None:
  number = fields.number_value(keyword)
  return (number, "") if number is not None and number.isdigit() else None


_CELL_SYNONYMS = (("top", "upper"), ("bottom", "lower"), ("center", "centre"))


def _cells(keyword: str) -> tuple[str, str] | None:
  text = re.sub(r"[-_]", " ", keyword.lower())
  for word, cell_word in _CELL_SYNONYMS:
    text = re.sub(rf"\b{word}\b", cell_word, text)
  found = [c for c in knowledge.CELL_NAMES if re.search(rf"\b{c}\b", text)]
  return (knowledge.join_words(found), "") if found else None


_CLASS_NAMES = tuple((name, c.plural) for c in targets.TARGET_CLASSES for name in dict.fromkeys((c.plural, c.name)))


def _category(keyword: str) -> tuple[str, str] | None:
  text = keyword.lower()
  hits = [(m.start(), plural) for name, plural in _CLASS_NAMES
          if (m := re.search(rf"\b{re.escape(name)}\b", text))]
  return (min(hits)[1], "") if hits else None


_COVER_WORDS = {
    "water": ("water", "river", "rivers", "lake", "lakes", "sea", "ocean", "pond", "ponds", "reservoir"),
    "vegetation": ("vegetation", "farmland", "farmlands", "cropland", "crops", "fields", "forest", "forests",
                   "grassland", "trees"),
    "bare land": ("bare land", "bare soil", "desert", "sand"),
    "buildings": ("buildings", "building", "urban", "built-up", "residential"),
    "roads": ("roads", "road"),
    "runways": ("runways", "runway"),
}
_NO_BOUNDARY = "no distinct regions"  # the synthetic world's boundary value without a second cover


def _covers(keyword: str) -> tuple[str, str] | None:
  text = keyword.lower()
  if text == _NO_BOUNDARY:
    return (_NO_BOUNDARY, "")
  first = {}
  for cover in knowledge.COVER_NAMES:
    at = [m.start() for word in _COVER_WORDS[cover] if (m := re.search(rf"\b{re.escape(word)}\b", text))]
    if at:
      first[cover] = min(at)
  return (knowledge.join_words(sorted(first, key=first.get)), "") if first else None


QUESTIONS = {
    "vqa_count": Question("how many targets are in the image?", "target", "count", answer_of=_count,
                          reads="a number", closed=True),
    "vqa_recognition": Question("what kind of targets are these?", "target", "category", answer_of=_category,
                                reads="a target class (" + ", ".join(c.plural for c in targets.TARGET_CLASSES) + ")",
                                closed=True),
    "vqa_position": Question("in which cells of a 3x3 grid are the targets?", "target", "location",
                             answer_of=_cells, reads="3x3 grid cells (upper left ... lower right)", closed=True),
    "vqa_landform": Question("what is the main landform?", "landform", "terrain"),
    "vqa_landforms_present": Question("which land covers meet in the scene?", "landform", "boundary",
                                      answer_of=_covers, reads="land covers (water, vegetation, bare land, "
                                      "buildings, roads, runways, or words for them)", closed=True),
    "vqa_region_landform": Question("which land cover lies mainly in the named cell?", "landform",
                                    "distribution", answer_of=_region,
                                    keyword_of=lambda answer, cell: f"{answer}{_REGION_SEP}{cell}",
                                    reads=f"'<land cover>{_REGION_SEP}<cell>'"),
}


def _keywords(question: Question, split: Split) -> list[tuple[int, str]]:
  """(chip index, true keyword of the question's field) of the split's chips of its scene type."""
  return [(i, keywords[record["field_names"].index(question.field)])
          for i, (record, keywords) in enumerate(zip(split.records, split.keywords))
          if record["scene_type"] == question.scene_type]


def _answers(question: Question, split: Split) -> list[tuple[int, str, str]]:
  """(chip index, answer, context) of every chip the question applies to."""
  return [(i, *answer) for i, keyword in _keywords(question, split)
          if (answer := question.answer_of(keyword)) is not None]


def _no_answers(question: Question, split: Split) -> str:
  """Why a split gives the question no answer: no chip of its scene type, or none whose keyword
  has the form the question reads."""
  chips = _keywords(question, split)
  if not chips:
    return f"the {split.name} split has no {question.scene_type} chips"
  return (f"none of the {len(chips)} {question.scene_type} chips of the {split.name} split has a {question.field} "
          f"keyword that answers it: the question reads {question.reads} (e.g. {chips[0][1]!r})")


@dataclasses.dataclass
class Plan:
  """The questions asked and the candidate answers of one question type on one split."""

  question: Question
  asked: list[tuple[int, str, str]]  # (chip, true answer, context)
  candidates: list[str]
  train_answers: collections.Counter


def plan(name: str, test: Split, train: Split, *, max_questions: int, max_candidates: int) -> Plan:
  """What `name` asks of `test` with train's answer vocabulary; NoTruth with the reason when
  the data cannot score it (runs no model)."""
  question = QUESTIONS[name]
  train_answers = collections.Counter(answer for _, answer, _ in _answers(question, train))
  asked = _answers(question, test)[:max_questions]
  for split, found in ((test, asked), (train, train_answers)):
    if not found:
      raise NoTruth(_no_answers(question, split))
  candidates = [a for a, _ in train_answers.most_common(max_candidates)]
  missing = [answer for _, answer, _ in asked if answer not in set(candidates)]
  if not question.closed and len(missing) > (1 - MIN_COVERAGE) * len(asked):
    raise NoTruth(f"the {question.field} answers are free text here: {len(missing)} of {len(asked)} {test.name} "
                  f"answers (e.g. {missing[0]!r}) are not among the {len(candidates)} most frequent train answers "
                  f"({len(train_answers)} distinct in {sum(train_answers.values())} train chips); ranking answers "
                  "that do not recur measures nothing")
  return Plan(question, asked, candidates, train_answers)


def _clauses(codec: TextCodec, question: Question, keyword: str) -> tuple[np.ndarray, np.ndarray]:
  """Each template's clause with `keyword`, closed by "$": ids [templates, L] and the mask
  [templates, L - 1] of the predictions that score it (keyword tokens and the next token)."""
  ids, scored = [], []
  for template in knowledge.TEMPLATES[question.scene_type][question.field]:
    start = template.index("{}")
    encoded = codec.encode(template.format(keyword) + knowledge.SEPARATOR, [(start, start + len(keyword))])
    mask = encoded.keyword_mask.astype(bool)
    mask[1 + np.flatnonzero(mask)[-1]] = True  # the token after the keyword ends it
    ids.append(encoded.ids)
    scored.append(mask[1:])  # prediction t scores token t + 1
  return np.stack(ids), np.stack(scored)


def evaluate(name: str, runner: ModelRunner, codec: TextCodec, test: Split, image_tokens: np.ndarray,
             train: Split, *, max_questions: int, max_candidates: int) -> dict:
  return score(plan(name, test, train, max_questions=max_questions, max_candidates=max_candidates),
               runner, codec, image_tokens)


def score(planned: Plan, runner: ModelRunner, codec: TextCodec, image_tokens: np.ndarray) -> dict:
  """Accuracy of the decoder's ranking of the candidates, with its chance levels."""
  question, asked, candidates, train_answers = (planned.question, planned.asked, planned.candidates,
                                                planned.train_answers)
  index = {a: k for k, a in enumerate(candidates)}
  templates = len(knowledge.TEMPLATES[question.scene_type][question.field])
  # One row per (question, candidate, template).
  clauses = [_clauses(codec, question, question.keyword_of(c, context))
             for _, _, context in asked for c in candidates]
  ids = np.concatenate([i for i, _ in clauses])
  scored = np.concatenate([m for _, m in clauses])
  chips = np.repeat([i for i, _, _ in asked], len(candidates) * templates)
  logp = runner.token_logprobs(image_tokens, ids, rows=chips)
  scores = (logp * scored).sum(axis=1).reshape(len(asked), len(candidates), templates).mean(axis=-1)
  truth = np.asarray([index.get(answer, -1) for _, answer, _ in asked])
  train_truth = np.asarray([index.get(a, -1) for a in train_answers.elements()])
  out = metrics.answer_ranking(scores, truth, train_truth)
  out["question"] = question.text
  return out
