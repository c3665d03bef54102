"""The benchmark's metrics, on plain numpy arrays, each with the level a model without image
information reaches (chance or majority), so every number in the report has its floor beside it.

Generic measures come from maintained libraries: scikit-learn (accuracy, confusion, F1, ROC AUC,
Jaccard), pycocoevalcap (BLEU, CIDEr) and pycocotools (detection AP, in `detection.py`).
What is specific to the benchmark (recall@k over a score matrix, the chance levels) is here.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

KS = (1, 5, 10)


def recall_at_k(i2t: np.ndarray, t2i: np.ndarray | None = None, ks: Sequence[int] = KS) -> dict:
  """Image->text and text->image recall@k; item i of one side matches item i of the other.

  `i2t` [N_images, N_texts] scores texts per image; `t2i` [N_texts, N_images] scores images
  per text (default: i2t transposed; ITM re-ranking scores each direction separately). A tie
  with the correct item counts in its favour; a correct item scored -inf (left out of a
  re-ranked top k) is a miss at every k. Chance R@k is k / N.
  """
  t2i = i2t.T if t2i is None else t2i
  out = {}
  for name, scores in (("i2t", i2t), ("t2i", t2i)):
    n = scores.shape[0]
    correct = scores[np.arange(n), np.arange(n)][:, None]
    rank = (scores > correct).sum(axis=1)  # 0: the correct item scores highest
    rank[np.isneginf(correct[:, 0])] = scores.shape[1]  # never scored (outside a re-ranked top k)
    for k in ks:
      out[f"{name}_r{k}"] = float(np.mean(rank < k))
  out["r_mean"] = float(np.mean([out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks]))
  for k in ks:
    out[f"chance_r{k}"] = min(k / i2t.shape[1], 1.0)
  out["chance_r_mean"] = float(np.mean([out[f"chance_r{k}"] for k in ks]))
  return out


def majority_label(labels: np.ndarray) -> int:
  """The most frequent label (the smallest one on ties)."""
  return int(np.bincount(np.asarray(labels)).argmax())


def classification(pred: np.ndarray, truth: np.ndarray, train_labels: np.ndarray,
                   num_classes: int) -> dict:
  """Accuracy, balanced accuracy and the confusion matrix, with the majority baseline: always
  answering the most frequent training label."""
  majority = np.full_like(truth, majority_label(train_labels))
  with warnings.catch_warnings():  # a prediction of a class absent from truth is no error here
    warnings.simplefilter("ignore", UserWarning)
    balanced = [float(skm.balanced_accuracy_score(truth, p)) for p in (pred, majority)]
  return {"accuracy": float(skm.accuracy_score(truth, pred)),
          "balanced_accuracy": balanced[0],
          "chance_accuracy": float(skm.accuracy_score(truth, majority)),
          "chance_balanced_accuracy": balanced[1],
          "num_examples": len(truth),
          "confusion": confusion(pred, truth, num_classes)}


CHANCE_AUC = 0.5  # a score that carries no information about the label, ties included


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve: the probability that a random label-1 item scores above a random
  label-0 one (ties count half). NaN when only one class is present. Chance: 0.5. Scores may be
  infinite (a rule that never flags a clause scores it -inf): the AUC reads only their order."""
  labels = np.asarray(labels, bool)
  if labels.all() or not labels.any():
    return float("nan")
  return float(skm.roc_auc_score(labels, stats.rankdata(scores)))


def binary_accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
  """Accuracy and balanced accuracy of predicting label 1 where score > threshold, with their
  floors: the majority-class rate (always answering the more frequent label) and 0.5."""
  labels = np.asarray(labels, bool)
  pred = np.asarray(scores) > threshold
  with warnings.catch_warnings():  # a predicted class absent from the labels is no error here
    warnings.simplefilter("ignore", UserWarning)
    balanced = float(skm.balanced_accuracy_score(labels, pred))
  positive_rate = float(labels.mean())
  return {"accuracy": float(skm.accuracy_score(labels, pred)), "balanced_accuracy": balanced,
          "chance_accuracy": max(positive_rate, 1.0 - positive_rate),
          "chance_balanced_accuracy": 0.5}


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[list[int]]:
  """[true class][predicted class] counts."""
  return skm.confusion_matrix(truth, pred, labels=np.arange(num_classes)).tolist()


def mean_iou(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
  """Mean intersection-over-union over the classes that occur in truth or prediction."""
  pred, truth = np.ravel(pred), np.ravel(truth)
  present = np.union1d(np.unique(pred), np.unique(truth))
  return float(skm.jaccard_score(truth, pred, labels=present, average="macro", zero_division=0))


def multilabel(pred: np.ndarray, truth: np.ndarray, train_truth: np.ndarray) -> dict:
  """Exact-match accuracy and micro F1 of [N, K] binary predictions.

  Baselines: exact match of always answering the training split's most frequent label set,
  and the F1 of answering every label positive (the best F1 that needs no image).
  """
  pred, truth, train_truth = (np.asarray(a, bool) for a in (pred, truth, train_truth))
  patterns, counts = np.unique(train_truth, axis=0, return_counts=True)
  common = patterns[counts.argmax()]
  return {"exact_match": float(np.mean((pred == truth).all(axis=1))),
          "f1": float(skm.f1_score(truth, pred, average="micro", zero_division=0)),
          "chance_exact_match": float(np.mean((truth == common).all(axis=1))),
          "chance_f1": float(skm.f1_score(truth, np.ones_like(truth), average="micro", zero_division=0)),
          "num_examples": len(truth)}


def words(text: str) -> str:
  """Lower-case words and clause separators, space-joined: the tokenisation BLEU/CIDEr see
  (pycocoevalcap's PTB tokenizer needs Java; template captions need nothing more)."""
  return " ".join(re.findall(r"[\w']+|\$", text.lower()))


def caption_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
  """Corpus BLEU-4 and CIDEr-D of one hypothesis per image against its references."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider

  refs = {i: [words(r) for r in rs] for i, rs in enumerate(references)}
  hyps = {i: [words(h)] for i, h in enumerate(hypotheses)}
  bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
  cider, _ = Cider().compute_score(refs, hyps)
  return {"bleu4": float(bleu[3]), "cider": float(cider)}


def answer_ranking(scores: np.ndarray, answers: np.ndarray, train_answers: np.ndarray) -> dict:
  """VQA accuracy of ranking candidate answers: `scores` [N, C] per candidate, `answers` [N]
  the index of the true candidate (-1: not among the candidates, always wrong).

  Baselines: always the training split's most frequent answer, and a uniform guess among the
  candidates (right with probability 1/C on the questions whose answer is a candidate).
  """
  answers = np.asarray(answers)
  known = np.asarray(train_answers)[np.asarray(train_answers) >= 0]
  common = majority_label(known) if known.size else -1
  return {"accuracy": float(np.mean(scores.argmax(axis=1) == answers)),
          "chance_accuracy": float(np.mean((answers == common) & (answers >= 0))),
          "chance_uniform": float(np.mean(answers >= 0)) / scores.shape[1],
          "num_questions": len(answers), "num_candidates": int(scores.shape[1])}
