"""KV-cached decoding with the image-grounded causal decoder.

SCIO's proofreading rewrites one keyword per caption in place: `prefill_caption` runs the
caption once to build the per-layer key/value cache (and scores each written token, which
SCIO's decoder screening rule reads), then
- `generate_span` writes a new keyword left to right from the tokens before it, one cached
  step per token, until the decoder predicts a token that ends the keyword (the first token
  after the old keyword, the clause separator or [SEP]): the decoder decides the length;
- `score_spans` ranks given candidate keywords by the decoder's log-likelihood of each
  candidate followed by the token that ends it (one cached step per candidate token).
The paper's released code takes argmax predictions at masked positions of a causal decoder,
which is off by one and keeps the old length; we decode left to right instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from klip_jax.model.klip import KLIP


def prefill_caption(model: KLIP, image_tokens: jax.Array, ids: jax.Array, pad_mask: jax.Array, *,
                    dec_id: int) -> tuple[jax.Array, tuple]:
  """One decoder pass over the caption `ids` [B, L] ([DEC] in place of its first token) ->
  (token_logp [B, L]: log p(ids[t] | image, ids[:t]) for t >= 1 and 0 at t = 0, the caption
  as written scored by the same pass; the per-layer KV cache)."""
  tower = model.decoder_tower()
  hidden, cache = tower.prefill(ids.at[:, 0].set(dec_id), pad_mask, image_tokens)
  log_probs = jax.nn.log_softmax(tower.logits(hidden[:, :-1]).astype(jnp.float32), axis=-1)
  written = jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(written, ((0, 0), (1, 0))), cache


def _banned_table(vocab: int, ids: Sequence[int]) -> jax.Array:
  return jnp.zeros(vocab, bool).at[jnp.asarray(tuple(ids), jnp.int32)].set(True)


def generate_span(model: KLIP, cache, ids: jax.Array, start: jax.Array, stop_ids: jax.Array, *,
                  dec_id: int, banned_ids: Sequence[int], max_len: int,
                  banned_first_ids: Sequence[int] = ()) -> tuple[jax.Array, jax.Array]:
  """Greedy keyword generation at `start` [B] (>= 1) of each caption (cache from
  `prefill_caption`): -> (span [B, max_len] token ids, length [B]), the span's entries past
  `length` meaningless. A row ends when the decoder's best token is one of its `stop_ids`
  [B, S] (not allowed as the first token: a keyword is never empty) or after `max_len` tokens.
  Tokens in `banned_ids` are never written, those in `banned_first_ids` not first."""
  tower = model.decoder_tower()
  ids = ids.at[:, 0].set(dec_id)  # as prefilled
  b, length = ids.shape
  rows = jnp.arange(b)
  vocab = tower.word_embed.num_embeddings
  banned = _banned_table(vocab, banned_ids)
  banned_first = banned | _banned_table(vocab, banned_first_ids)
  is_stop = jnp.zeros((b, vocab), bool).at[rows[:, None], stop_ids].set(True)
  graph, params = nnx.split(tower)

  def body(j, carry):
    span, count, done, cache, params = carry
    previous = jnp.where(j == 0, ids[rows, jnp.maximum(start - 1, 0)], span[:, jnp.maximum(j - 1, 0)])
    position = jnp.clip(start - 1 + j, 0, length - 1)
    logits, cache = nnx.merge(graph, params).step(previous, position, cache)
    excluded = jnp.where(j == 0, banned_first[None] | is_stop, banned[None] & ~is_stop)
    token = jnp.where(excluded, -jnp.inf, logits).argmax(-1).astype(span.dtype)
    done = done | is_stop[rows, token]
    span = span.at[:, j].set(jnp.where(done, 0, token))
    return span, jnp.where(done, count, j + 1), done, cache, params

  init = (jnp.zeros((b, max_len), ids.dtype), jnp.zeros(b, jnp.int32), jnp.zeros(b, bool), cache, params)
  span, count, _, _, _ = jax.lax.fori_loop(0, max_len, body, init)
  return span, count


def score_spans(model: KLIP, cache, ids: jax.Array, start: jax.Array, candidates: jax.Array,
                lengths: jax.Array, end_ids: jax.Array, *, dec_id: int) -> jax.Array:
  """Log-likelihood [B, C] of candidate keywords `candidates` [B, C, T] (`lengths` [B, C] tokens
  each; 0 marks no candidate, scored -inf) written at `start` [B] (>= 1) of each caption, each
  followed by its row's `end_ids` [B] (the token after the keyword). Greedy-free teacher forcing
  on the cache from `prefill_caption`, every candidate a copy of its row's cache."""
  tower = model.decoder_tower()
  ids = ids.at[:, 0].set(dec_id)  # as prefilled
  b, c, t = candidates.shape
  length = ids.shape[1]
  rows = jnp.arange(b)
  flat = candidates.reshape(b * c, t)
  count = lengths.reshape(b * c)
  first = jnp.repeat(start, c)
  previous0 = jnp.repeat(ids[rows, jnp.maximum(start - 1, 0)], c)
  ends = jnp.repeat(end_ids, c)
  cache = tower.cache_rows(cache, jnp.repeat(jnp.arange(b), c))  # B * C rows
  graph, params = nnx.split(tower)

  def body(j, carry):
    total, cache, params = carry
    previous = jnp.where(j == 0, previous0, flat[:, jnp.maximum(j - 1, 0)])
    position = jnp.clip(first - 1 + j, 0, length - 1)
    logits, cache = nnx.merge(graph, params).step(previous, position, cache)
    target = jnp.where(j < count, flat[:, jnp.minimum(j, t - 1)], ends)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), target[:, None], axis=-1)[:, 0]
    return total + jnp.where(j <= count, logp, 0.0), cache, params

  total, _, _ = jax.lax.fori_loop(0, t + 1, body, (jnp.zeros(b * c, jnp.float32), cache, params))
  return jnp.where(lengths > 0, total.reshape(b, c), -jnp.inf)


def generate(model: KLIP, image_tokens: jax.Array, *, max_len: int, dec_id: int, sep_id: int,
             pad_id: int, banned_ids: Sequence[int] = (), beam_size: int = 1,
             length_penalty: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Captions for images: ([B, max_len] ids starting with [DEC], [B] log-probabilities).

  Greedy when beam_size == 1, else beam search; every step is one cached decoder step.
  Generation of a row ends at [SEP] (kept) and is padded after it. Beams are ranked by total
  log-probability / length ** length_penalty. `max_len` may not exceed the decoder's max_len:
  later positions have no embedding (their lookups read NaN, and the captions came out padded).
  """
  b = image_tokens.shape[0]
  k = beam_size
  tower = model.decoder_tower()
  if max_len > tower.max_len:
    raise ValueError(f"generate(max_len={max_len}) exceeds the decoder's max_len {tower.max_len} positions")
  vocab = tower.word_embed.num_embeddings
  image_tokens = jnp.repeat(image_tokens, k, axis=0)  # row r*k + i is beam i of image r
  ids = jnp.full((b * k, max_len), pad_id, jnp.int32).at[:, 0].set(dec_id)
  cache = tower.empty_cache(b * k, max_len, image_tokens)  # step t writes position t before reading it
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
    if k > 1:  # beams move within their image: only the self-attention keys/values follow them
      cache = tower.cache_rows(cache, origin, image=False)
    lengths = new_lengths.reshape(-1)[origin]
    done = done[origin] | (token == sep_id)
    return ids, cache, scores, done, lengths, params

  ids, _, scores, _, lengths, _ = jax.lax.fori_loop(
      0, max_len - 1, body, (ids, cache, scores, done, lengths, params))
  best = (scores / lengths.astype(jnp.float32) ** length_penalty).reshape(b, k).argmax(axis=1)
  rows = jnp.arange(b) * k + best
  return ids[rows], scores[rows]
