"""KV-cached decoding with the image-grounded causal decoder.

`fill_spans` rewrites one contiguous span of tokens per caption left to right: the prefix is
run once (prefill) to build the per-layer key/value cache, then each span token is predicted
from the tokens before it (including the ones just written) with a single-token step. This is
SCIO's proofreading; the paper's released code takes argmax predictions at masked positions of
a causal decoder, which is off by one, so we fill left to right instead.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from klip_jax.model.klip import KLIP


def fill_spans(model: KLIP, image_tokens: jax.Array, ids: jax.Array, pad_mask: jax.Array,
               fill_mask: jax.Array, *, dec_id: int, banned_ids: Sequence[int], max_fill: int,
               banned_first_ids: Sequence[int] = ()) -> jax.Array:
  """ids [B, L] with the True positions of `fill_mask` (one contiguous span per row, possibly
  empty, never position 0) replaced by greedy decoder predictions; at most `max_fill` tokens
  per row are rewritten. Tokens in `banned_ids` (special tokens, the clause separator) are
  never produced, and those in `banned_first_ids` not as a span's first token."""
  tower = model.decoder_tower()
  first = ids[:, :1]
  dec_ids = ids.at[:, 0].set(dec_id)
  _, cache = tower.prefill(dec_ids, pad_mask, image_tokens)
  start = jnp.argmax(fill_mask, axis=1)
  count = fill_mask.sum(axis=1)
  rows = jnp.arange(ids.shape[0])
  vocab = tower.word_embed.num_embeddings
  banned = jnp.zeros(vocab, bool).at[jnp.asarray(banned_ids, jnp.int32)].set(True)
  banned_first = banned.at[jnp.asarray(banned_first_ids, jnp.int32)].set(True)

  # NNX modules cross a raw JAX loop as (graph, state), the state riding in the carry.
  graph, params = nnx.split(tower)

  def body(j, carry):
    current, cache, params = carry
    position = jnp.maximum(start - 1 + j, 0)
    logits, cache = nnx.merge(graph, params).step(current[rows, position], position, cache)
    prediction = jnp.where(jnp.where(j == 0, banned_first, banned), -jnp.inf, logits)
    prediction = prediction.argmax(-1).astype(current.dtype)
    write = j < count
    target = jnp.where(write, start + j, 0)
    current = current.at[rows, target].set(jnp.where(write, prediction, current[rows, target]))
    return current, cache, params

  filled, _, _ = jax.lax.fori_loop(0, max_fill, body, (dec_ids, cache, params))
  return jnp.concatenate([first, filled[:, 1:]], axis=1)
