"""How big a KLIP is, counted as the scaling-law literature counts it.

Kaplan et al. (2020) fit losses to N, the NON-EMBEDDING parameters: every parameter except
the vocabulary (token) embeddings and the position embeddings, the ones a forward pass looks up
rather than multiplies with (so N tracks the compute per token, ~2N FLOPs forward). Here that
leaves out, by name: the text towers' word embeddings (also the tied LM output matrix), their
position embeddings, the ViT's position embeddings and its class token (a learned position-0
input, looked up like a position embedding). The ViT's patch embedding stays in N: it is a dense
projection of every patch, compute like any other layer.
"""

from __future__ import annotations

import math

import jax

# Parameter (or module) names whose leaves are embeddings in Kaplan et al.'s sense.
EMBEDDINGS = frozenset({"word_embed", "pos_embed", "cls_token"})


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def parameter_counts(params) -> dict[str, int]:
  """{"total", "non_embedding"} of a parameter tree (arrays or shape-only structs, e.g. the
  abstract state `train.state.abstract_state` gives without allocating anything)."""
  total = non_embedding = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    size = math.prod(leaf.shape)
    total += size
    if not EMBEDDINGS & set(_names(path)):
      non_embedding += size
  return {"total": total, "non_embedding": non_embedding}
