"""KV-cached decoding with the image-grounded causal decoder.

`fill_spans` rewrites one contiguous span of tokens per caption left to right: the prefix is
run once (prefill) to build the per-layer key/value cache, then each span token is predicted
from the tokens before it (including the ones just written) with a single-token step. This is
SCIO's proofreading; the paper's released code takes argmax predictions at masked positions of
a causal decoder, which is off by one, so we fill left to right instead.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def generate(model: KLIP, image_tokens: jax.Array, *, max_len: int, dec_id: int, sep_id: int,
             pad_id: int, banned_ids: Sequence[int] = (), beam_size: int = 1,
             length_penalty: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Captions for images: ([B, max_len] ids starting with [DEC], [B] log-probabilities).

  Greedy when beam_size == 1, else beam search; every step is one cached decoder step.
  Generation of a row ends at [SEP] (kept) and is padded after it. Beams are ranked by total
  log-probability / length ** length_penalty.
  """
  b = image_tokens.shape[0]
  k = beam_size
  tower = model.decoder_tower()
  vocab = tower.word_embed.num_embeddings
  image_tokens = jnp.repeat(image_tokens, k, axis=0)  # row r*k + i is beam i of image r
  ids = jnp.full((b * k, max_len), pad_id, jnp.int32).at[:, 0].set(dec_id)
  _, cache = tower.prefill(ids, ids != pad_id, image_tokens)
  banned = jnp.zeros(vocab, bool).at[jnp.asarray(tuple(banned_ids) + (pad_id, dec_id), jnp.int32)].set(True)
  # Only beam 0 is live at the start, so the first expansion does not repeat itself.
  scores = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), b)
  done = jnp.zeros(b * k, bool)
  lengths = jnp.ones(b * k, jnp.int32)
  graph, params = nnx.split(tower)

  def body(t, carry):
    ids, cache, scores, done, lengths, params = carry
    logits, cache = nnx.merge(graph, params).step(ids[:, t], jnp.full((b * k,), t), cache)
    logp = jax.nn.log_softmax(jnp.where(banned, -jnp.inf, logits), axis=-1)
    # A finished beam extends only with padding, at no cost.
    logp = jnp.where(done[:, None], jnp.where(jnp.arange(vocab) == pad_id, 0.0, -jnp.inf), logp)
    total = (scores[:, None] + logp).reshape(b, k * vocab)
    new_lengths = jnp.where(done, lengths, lengths + 1).reshape(b, k)
    rank = total / jnp.repeat(new_lengths, vocab, axis=1).astype(jnp.float32) ** length_penalty
    _, choice = jax.lax.top_k(rank, k)  # [b, k] over (beam, token)
    origin = (choice // vocab + jnp.arange(b)[:, None] * k).reshape(-1)
    token = (choice % vocab).reshape(-1).astype(jnp.int32)
    scores = jnp.take_along_axis(total, choice, axis=1).reshape(-1)
    ids = ids[origin].at[:, t + 1].set(token)
    cache = jax.tree.map(lambda c: c[:, origin], cache)
    lengths = new_lengths.reshape(-1)[origin]
    done = done[origin] | (token == sep_id)
    return ids, cache, scores, done, lengths, params

  ids, _, scores, _, lengths, _ = jax.lax.fori_loop(
      0, max_len - 1, body, (ids, cache, scores, done, lengths, params))
  best = (scores / lengths.astype(jnp.float32) ** length_penalty).reshape(b, k).argmax(axis=1)
  rows = jnp.arange(b) * k + best
  return ids[rows], scores[rows]
