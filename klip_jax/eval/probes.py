"""Linear probes on frozen image features: what the pretrained ViT's tokens already encode.

Each probe is a scikit-learn logistic regression on standardised features (lbfgs: the fit is
deterministic), trained on the train split and scored on the test split:
- target classification: the class tokens of target scenes -> their main target class;
- land-cover segmentation: patch tokens -> the majority land cover of the patch's pixels;
  class probabilities are bilinearly upsampled to pixels and scored by mIoU;
- target positioning: tokens pooled over each cell of a 3x3 grid (+ which cell it is) ->
  does a target centre lie in the cell; scored per chip by exact match and F1 over 9 cells.
"""

from __future__ import annotations

import jax
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from klip_jax.data import terrain
from klip_jax.data.records import UNKNOWN_LANDCOVER
from klip_jax.data.targets import TARGET_CLASSES
from klip_jax.eval import metrics
from klip_jax.eval.truth import NoTruth, Split


def fit(features: np.ndarray, labels: np.ndarray, seed: int):
  if len(np.unique(labels)) < 2:
    raise NoTruth(f"the probe's training labels hold a single class ({np.unique(labels)}); "
                  "it needs at least two (add train examples)")
  probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
  return probe.fit(features, labels)


def patch_grid(image_tokens: np.ndarray) -> np.ndarray:
  """ViT tokens [N, 1 + g*g, D] -> patch tokens [N, g, g, D]."""
  n, count, d = image_tokens.shape
  g = round((count - 1) ** 0.5)
  return image_tokens[:, 1:].reshape(n, g, g, d)


def main_target_class(split: Split) -> np.ndarray:
  """Most frequent box class per chip (-1 without boxes), as the category field names it."""
  return np.asarray([int(np.bincount(r["truth"]["box_classes"]).argmax()) if len(r["truth"]["box_classes"])
                     else -1 for r in split.records])


def target_classification(train: Split, train_tokens: np.ndarray, test: Split, test_tokens: np.ndarray,
                          seed: int) -> dict:
  train_labels, test_labels = main_target_class(train), main_target_class(test)
  a, b = train_labels >= 0, test_labels >= 0
  if not a.any() or not b.any():
    raise NoTruth("no target boxes in the train or test split")
  probe = fit(train_tokens[a, 0], train_labels[a], seed)
  return metrics.classification(probe.predict(test_tokens[b, 0]), test_labels[b], train_labels[a],
                                len(TARGET_CLASSES))


def patch_labels(landcover: np.ndarray, g: int) -> np.ndarray:
  """[N, H, W] pixel classes -> [N, g, g] majority known class per patch (-1: all unknown)."""
  n, h, _ = landcover.shape
  p = h // g
  patches = landcover.reshape(n, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(n, g, g, p * p)
  counts = np.stack([(patches == c).sum(-1) for c in range(len(terrain.LANDCOVER))], axis=-1)
  return np.where(counts.sum(-1) > 0, counts.argmax(-1), -1)


def segmentation(train: Split, train_tokens: np.ndarray, test: Split, test_tokens: np.ndarray,
                 seed: int, max_patches: int) -> dict:
  train_grid, test_grid = patch_grid(train_tokens), patch_grid(test_tokens)
  g, num_classes = train_grid.shape[1], len(terrain.LANDCOVER)
  train_cover = np.stack([r["truth"]["landcover"] for r in train.records])
  test_cover = np.stack([r["truth"]["landcover"] for r in test.records])
  labels = patch_labels(train_cover, g).reshape(-1)
  features = train_grid.reshape(len(labels), -1)
  known = np.flatnonzero(labels >= 0)
  if not known.size or not (test_cover != UNKNOWN_LANDCOVER).any():
    raise NoTruth("no land-cover masks in the train or test split")
  chosen = np.random.default_rng(seed).permutation(known)[:max_patches]
  probe = fit(features[chosen], labels[chosen], seed)
  proba = np.zeros((test_grid.shape[0] * g * g, num_classes), np.float32)
  proba[:, probe.classes_] = probe.predict_proba(test_grid.reshape(-1, test_grid.shape[-1]))
  proba = proba.reshape(-1, g, g, num_classes)
  size = test_cover.shape[1:]
  pred = np.concatenate([np.asarray(jax.image.resize(proba[s:s + 64], (len(proba[s:s + 64]), *size, num_classes),
                                                     "linear")).argmax(-1) for s in range(0, len(proba), 64)])
  known_px = test_cover != UNKNOWN_LANDCOVER
  majority = metrics.majority_label(train_cover[train_cover != UNKNOWN_LANDCOVER])
  truth = test_cover[known_px]
  return {"miou": metrics.mean_iou(pred[known_px], truth, num_classes),
          "pixel_accuracy": float(np.mean(pred[known_px] == truth)),
          "chance_miou": metrics.mean_iou(np.full_like(truth, majority), truth, num_classes),
          "chance_pixel_accuracy": float(np.mean(truth == majority)),
          "probe_patches": len(chosen), "num_images": len(test_cover),
          "confusion": metrics.confusion(pred[known_px], truth, num_classes)}


def cell_weights(g: int) -> np.ndarray:
  """[9, g*g]: the area fraction of each 3x3 grid cell covered by each of g x g patches."""
  edges_p, edges_c = np.linspace(0, 1, g + 1), np.linspace(0, 1, 4)
  overlap = np.clip(np.minimum(edges_c[1:, None], edges_p[None, 1:]) -
                    np.maximum(edges_c[:-1, None], edges_p[None, :-1]), 0, None)  # [3, g]
  weights = np.einsum("ar,bc->abrc", overlap, overlap).reshape(9, g * g)
  return weights / weights.sum(axis=1, keepdims=True)


def cell_features(image_tokens: np.ndarray) -> np.ndarray:
  """[N, 1 + g*g, D] -> [N * 9, D + 9]: area-weighted mean patch token of each cell, plus a
  one-hot of the cell (so one shared classifier can learn per-cell priors)."""
  grid = patch_grid(image_tokens)
  n, g = grid.shape[:2]
  pooled = np.einsum("kp,npd->nkd", cell_weights(g), grid.reshape(n, g * g, -1))
  return np.concatenate([pooled, np.broadcast_to(np.eye(9), (n, 9, 9))], axis=-1).reshape(n * 9, -1)


def positioning(train: Split, train_tokens: np.ndarray, test: Split, test_tokens: np.ndarray,
                seed: int) -> dict:
  def targets(split):
    return np.flatnonzero([len(r["truth"]["boxes"]) > 0 for r in split.records])

  a, b = targets(train), targets(test)
  if not a.size or not b.size:
    raise NoTruth("no target boxes in the train or test split")
  train_grid = np.stack([train.records[i]["truth"]["grid"].reshape(9) for i in a]).astype(bool)
  test_grid = np.stack([test.records[i]["truth"]["grid"].reshape(9) for i in b]).astype(bool)
  probe = fit(cell_features(train_tokens[a]), train_grid.reshape(-1), seed)
  pred = probe.predict(cell_features(test_tokens[b])).reshape(-1, 9)
  return metrics.multilabel(pred, test_grid, train_grid)
