"""Zero-shot land-cover scene classification: each chip's dominant land cover, predicted by
ITC similarity to class prompts, with no training on the labels.

A class's prompt is the functionality clause a scene of that dominant cover would get, in
each of its templates; the text features of a class's prompts are averaged and renormalised
(CLIP's prompt ensembling). Chips with an unknown land cover are skipped.
"""

from __future__ import annotations

import numpy as np

from klip_jax.data import knowledge, terrain
from klip_jax.data.records import UNKNOWN_CLASS
from klip_jax.data.tokenizer import TextCodec
from klip_jax.eval import metrics
from klip_jax.eval.runner import ModelRunner
from klip_jax.eval.truth import NoTruth, Split


def class_features(runner: ModelRunner, codec: TextCodec) -> np.ndarray:
  """Normalised prompt-ensemble text features [num_classes, E]."""
  features = []
  for cover in range(len(terrain.LANDCOVER)):
    prompts = knowledge.landcover_prompts(cover)
    mean = runner.encode_texts(np.stack([codec.encode(p).ids for p in prompts])).mean(axis=0)
    features.append(mean / np.linalg.norm(mean))
  return np.stack(features)


def dominant(split: Split) -> np.ndarray:
  return np.asarray([int(r["truth"]["dominant"]) for r in split.records])


def evaluate(runner: ModelRunner, codec: TextCodec, test: Split, image_feat: np.ndarray,
             train: Split) -> dict:
  truth = dominant(test)
  known = truth != UNKNOWN_CLASS
  train_truth = dominant(train)
  if not known.any() or (train_truth == UNKNOWN_CLASS).all():
    raise NoTruth("no land-cover masks in the test or train split")
  pred = (image_feat[known] @ class_features(runner, codec).T).argmax(axis=1)
  return metrics.classification(pred, truth[known], train_truth[train_truth != UNKNOWN_CLASS],
                                len(terrain.LANDCOVER))
