"""Image-text retrieval on a held-out split, as BLIP evaluates it.

ITC ranks every caption for every image (and back) by cosine similarity; then the top k
candidates of each query are re-scored by the image-grounded ITM head (its match logit plus
the ITC similarity, BLIP's rule) and everything outside the top k ranks below them. Both the
ITC-only and the re-ranked recall@1/5/10 are reported; each image's own true caption is its
one correct text.
"""

from __future__ import annotations

import numpy as np

from klip_jax.eval import metrics
from klip_jax.eval.runner import ModelRunner
from klip_jax.eval.truth import Split


def rerank(similarity: np.ndarray, k: int, score_pairs) -> np.ndarray:
  """Scores [Q, C] where each query's top-k candidates by `similarity` hold
  score_pairs(query_idx, candidate_idx) + similarity and the rest -inf."""
  q, c = similarity.shape
  k = min(k, c)
  top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
  queries = np.repeat(np.arange(q), k)
  candidates = top.reshape(-1)
  itm = score_pairs(queries, candidates)
  scores = np.full((q, c), -np.inf, np.float32)
  scores[queries, candidates] = itm + similarity[queries, candidates]
  return scores


def evaluate(runner: ModelRunner, split: Split, image_tokens: np.ndarray, image_feat: np.ndarray,
             text_feat: np.ndarray, rerank_k: int) -> tuple[dict, np.ndarray]:
  """(metrics, i2t score matrix after re-ranking) on `split`."""
  similarity = image_feat @ text_feat.T
  ids = split.text_ids

  def i2t_pairs(images, texts):
    return runner.itm_logits(image_tokens, ids[texts], rows=images)[:, 1]

  i2t = rerank(similarity, rerank_k, i2t_pairs)
  t2i = rerank(similarity.T, rerank_k, lambda texts, images: i2t_pairs(images, texts))
  itc_only = metrics.recall_at_k(similarity)
  out = metrics.recall_at_k(i2t, t2i)
  out.update({f"itc_{name}": value for name, value in itc_only.items() if not name.startswith("chance")})
  out["rerank_k"] = min(rerank_k, len(split))
  return out, i2t
