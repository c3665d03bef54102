"""Image-text matching (the ITM head) on a held-out split, scored as a ranking and as a decision.

Each image is paired with its own true caption (a positive), with the other caption closest to
it by ITC similarity (a hard negative, as BLIP's training mines them) and with a uniformly drawn
other caption (a random negative). A head whose match probability sits at its prior (below 0.5
everywhere) gets the majority accuracy 2/3 and balanced accuracy 0.5 whatever it has learnt;
the ROC AUC of its match probability still shows whether it ranks positives above negatives,
over all negatives and over each kind alone. A caption with the same tokens as the image's own
(template captions repeat) is a true match, never one of its negatives.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from klip_jax.eval import metrics
from klip_jax.eval.runner import ModelRunner
from klip_jax.eval.truth import NoTruth, Split


def negatives(text_ids: np.ndarray, image_feat: np.ndarray, text_feat: np.ndarray,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(hard, random) negative caption index per image: the highest-ITC caption whose text differs
  from the image's own, and a uniform draw among those captions."""
  _, text = np.unique(text_ids, axis=0, return_inverse=True)
  text = text.reshape(-1)
  other = text[:, None] != text[None, :]
  if not other.any(axis=1).all():  # one image without a differing caption: all are the same
    raise NoTruth("every caption of the split is the same text; ITM needs captions that differ")
  hard = np.where(other, image_feat @ text_feat.T, -np.inf).argmax(axis=1)
  draws = np.where(other, np.random.default_rng(seed).random(other.shape), -1.0)
  return hard, draws.argmax(axis=1)


def evaluate(runner: ModelRunner, split: Split, image_tokens: np.ndarray, image_feat: np.ndarray,
             text_feat: np.ndarray, seed: int) -> dict:
  """ROC AUC (all, hard and random negatives), accuracy and balanced accuracy of match
  probability > 0.5, and the mean match probability of positives and negatives on `split`."""
  n = len(split)
  if n < 2:
    raise NoTruth(f"ITM needs at least 2 examples (a caption and another one); the split has {n}")
  hard, random = negatives(split.text_ids, image_feat, text_feat, seed)
  own = np.arange(n)
  texts = np.concatenate([own, hard, random])
  logits = runner.itm_logits(image_tokens, split.text_ids[texts], rows=np.tile(own, 3))
  prob = special.softmax(np.asarray(logits, np.float64), axis=1)[:, 1]
  positive = np.arange(3 * n) < n
  pair_labels = np.repeat([True, False], n)
  out = {"auc": metrics.roc_auc(prob, positive),
         "auc_hard": metrics.roc_auc(prob[:2 * n], pair_labels),
         "auc_random": metrics.roc_auc(np.concatenate([prob[:n], prob[2 * n:]]), pair_labels)}
  out.update(metrics.binary_accuracy(prob, positive, threshold=0.5))
  out.update(mean_match_prob_pos=float(prob[positive].mean()),
             mean_match_prob_neg=float(prob[~positive].mean()),
             chance_auc=metrics.CHANCE_AUC, num_images=n)
  return out
