"""Visual question answering by answer ranking, zero-shot from pretraining (BLIP's rank-answer).

Each question type is answered by one HCoT field: the question is posed as that field's
clause, and every candidate answer is scored by the image-grounded decoder's log-likelihood
of the candidate in the keyword slot: summed over the keyword's tokens and the one token that
ends it (so "upper left" and "upper left and centre" are told apart), given the clause
before it, averaged over the field's templates. Pretraining taught the decoder exactly these
keyword predictions (masked-keyword reconstruction). The highest-scoring candidate is the
answer. Candidates are the answers seen in the train split (the usual VQA answer vocabulary),
so a test answer never seen in training counts as wrong.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np

from klip_jax.data import knowledge
from klip_jax.data.tokenizer import TextCodec
from klip_jax.eval import metrics
from klip_jax.eval.runner import ModelRunner
from klip_jax.eval.truth import NoTruth, Split

_REGION_SEP = " mainly in the "


@dataclasses.dataclass(frozen=True)
class Question:
  """A question type: its words, the field whose clause answers it, and how a chip's true
  keyword gives (answer, context) and (candidate answer, context) gives the keyword."""

  text: str
  scene_type: str
  field: str
  answer_of: Callable[[str], tuple[str, str] | None] = lambda keyword: (keyword, "")
  keyword_of: Callable[[str, str], str] = lambda answer, context: answer


def _region(keyword: str) -> tuple[str, str] | None:
  cover, sep, cell = keyword.partition(_REGION_SEP)
  return (cover, cell) if sep else None  # "uniform ..." names no region


QUESTIONS = {
    "vqa_count": Question("how many targets are in the image?", "target", "count"),
    "vqa_recognition": Question("what kind of targets are these?", "target", "category"),
    "vqa_position": Question("in which cells of a 3x3 grid are the targets?", "target", "location"),
    "vqa_landform": Question("what is the main landform?", "landform", "terrain"),
    "vqa_landforms_present": Question("which land covers meet in the scene?", "landform", "boundary"),
    "vqa_region_landform": Question("which land cover lies mainly in the named cell?", "landform",
                                    "distribution", answer_of=_region,
                                    keyword_of=lambda answer, cell: f"{answer}{_REGION_SEP}{cell}"),
}


def _answers(question: Question, split: Split) -> list[tuple[int, str, str]]:
  """(chip index, answer, context) of every chip the question applies to."""
  out = []
  for i, (record, keywords) in enumerate(zip(split.records, split.keywords)):
    if record["scene_type"] != question.scene_type:
      continue
    answer = question.answer_of(keywords[record["field_names"].index(question.field)])
    if answer is not None:
      out.append((i, *answer))
  return out


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
  question = QUESTIONS[name]
  train_answers = collections.Counter(answer for _, answer, _ in _answers(question, train))
  asked = _answers(question, test)[:max_questions]
  if not train_answers or not asked:
    raise NoTruth(f"no {question.scene_type} chips with a {question.field} field in the train or test split")
  candidates = [a for a, _ in train_answers.most_common(max_candidates)]
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
