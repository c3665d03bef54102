"""BERT-style text transformer with BLIP's three modes (multimodal mixture of encoder-decoder).

- "text": unimodal encoder ([CLS] first), bidirectional self-attention only (for ITC);
- "multimodal": image-grounded encoder ([ENC] first), self-attention then cross-attention to
  the image tokens in every layer (for ITM);
- "decoder": image-grounded causal decoder ([DEC] first) for keyword reconstruction and
  captioning.
Post-LN residual blocks as in BERT. The decoder shares every weight with the encoder except
self-attention, which each layer holds separately as `causal_attn` (BLIP's tying); a config
flag instead gives the decoder a whole transformer of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from klip_jax.model import layers

MODES = ("text", "multimodal", "decoder")


class SubLayer(nnx.Module):
  """Attention followed by BERT's output dense + residual + LayerNorm."""

  def __init__(self, cfg, *, kv_width=None, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn = layers.Attention(cfg.width, cfg.heads, kv_width=kv_width, fused_qkv=False,
                                 std=cfg.init_std, implementation=cfg.attention, **kw)
    self.norm = layers.layer_norm(cfg.width, cfg.ln_eps, **kw)

  def __call__(self, x, context=None, mask=None, *, context_index=None, first_only=False):
    """Self-attention over x, or cross-attention to `context` [N, ...] (its keys and values
    are projected once, so rows that share an image share the projection): row b reads
    context `context_index[b]`, or without an index, the B = N g rows come in N groups of g
    consecutive rows and group n reads context n; a group's queries then attend as one
    sequence of g times the length, with no copy of the keys and values per row. `first_only`:
    only the first position's output is computed (what a [CLS] head reads), attending over
    every position as usual."""
    residual = x[:, :1] if first_only else x
    k, v = self.attn.keys_values(x if context is None else context)
    q = self.attn.queries(residual)
    if context_index is not None:
      k, v = k[context_index], v[context_index]
    elif context is not None and context.shape[0] != x.shape[0]:
      rows, groups = x.shape[0], context.shape[0]
      if rows % groups:
        raise ValueError(f"{rows} rows cannot be grouped over {groups} contexts; pass context_index.")
      out = self.attn.attend(q.reshape(groups, -1, *q.shape[2:]), k, v, None)
      return self.norm(residual + out.reshape(residual.shape))
    return self.norm(residual + self.attn.attend(q, k, v, mask))


class TextLayer(nnx.Module):
  def __init__(self, cfg, image_width: int, causal_attn: bool, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = SubLayer(cfg, **kw)
    self.causal_attn = SubLayer(cfg, **kw) if causal_attn else None
    self.cross_attn = SubLayer(cfg, kv_width=image_width, **kw)
    self.fc1 = layers.dense(cfg.width, cfg.mlp_dim, ("embed", "mlp"), std=cfg.init_std, **kw)
    self.fc2 = layers.dense(cfg.mlp_dim, cfg.width, ("mlp", "embed"), std=cfg.init_std, **kw)
    self.ffn_norm = layers.layer_norm(cfg.width, cfg.ln_eps, **kw)
    self.act = layers.gelu(cfg.approximate_gelu)

  def _self_attention(self, decoder: bool) -> SubLayer:
    return self.causal_attn if (decoder and self.causal_attn is not None) else self.self_attn

  def _ffn(self, x):
    h = layers.constrain(self.act(self.fc1(x)), ("batch", "length", "act_mlp"))
    x = self.ffn_norm(x + self.fc2(h))
    return layers.constrain(x, ("batch", "length", "act_embed"))

  def __call__(self, x, self_mask, image=None, decoder=False, image_index=None, first_only=False):
    x = self._self_attention(decoder)(x, mask=self_mask, first_only=first_only)
    if image is not None:
      x = self.cross_attn(x, context=image, context_index=image_index)
    return self._ffn(x)

  def prefill(self, x, self_mask, image):
    """Decoder-mode forward that also returns the cache: (self k, self v, image k, image v),
    each heads-first [B, heads, S, head_dim] (`layers.heads_first`)."""
    sub = self._self_attention(True)
    q, k, v = sub.attn.project(x)
    x = sub.norm(x + sub.attn.attend(q, k, v, self_mask))
    image_k, image_v = self.cross_attn.attn.keys_values(image)
    x = self.cross_attn.norm(x + self.cross_attn.attn.attend(self.cross_attn.attn.queries(x), image_k, image_v, None))
    return self._ffn(x), tuple(layers.heads_first(t) for t in (k, v, image_k, image_v))

  def empty_cache(self, batch: int, length: int, image):
    """The cache of a decoder that has read no text yet: zero self-attention keys/values (each
    step writes its own before attending) and the image's cross-attention keys/values."""
    image_k, image_v = (layers.heads_first(t) for t in self.cross_attn.attn.keys_values(image))
    attn = self._self_attention(True).attn
    empty = jnp.zeros((batch, attn.heads, length, attn.head_dim), image_k.dtype)
    return empty, empty, image_k, image_v

  def step(self, x, positions, cache):
    """One token per row (x [B, 1, D]) at `positions` [B]: write its k/v into the cache and
    attend to cached positions <= its own."""
    k_cache, v_cache, image_k, image_v = cache
    sub = self._self_attention(True)
    q, k, v = sub.attn.project(x)
    rows = jnp.arange(x.shape[0])
    k_cache = k_cache.at[rows, :, positions].set(k[:, 0].astype(k_cache.dtype))
    v_cache = v_cache.at[rows, :, positions].set(v[:, 0].astype(v_cache.dtype))
    mask = (jnp.arange(k_cache.shape[2])[None] <= positions[:, None])[:, None, None, :]
    x = sub.norm(x + sub.attn.attend_cached(q, k_cache, v_cache, mask))
    cross = self.cross_attn
    x = cross.norm(x + cross.attn.attend_cached(cross.attn.queries(x), image_k, image_v, None))
    return self._ffn(x), (k_cache, v_cache, image_k, image_v)


class LMHead(nnx.Module):
  """BERT's prediction head: dense + GELU + LayerNorm, then the tied word embeddings + bias."""

  def __init__(self, cfg, vocab_size: int, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.transform = layers.dense(cfg.width, cfg.width, ("embed", "mlp"), std=cfg.init_std, **kw)
    self.norm = layers.layer_norm(cfg.width, cfg.ln_eps, **kw)
    self.bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), ("vocab",))(
        rngs.params(), (vocab_size,), param_dtype))
    self.act = layers.gelu(cfg.approximate_gelu)

  def __call__(self, x, embedding: jax.Array) -> jax.Array:
    h = self.norm(self.act(self.transform(x)))
    logits = jnp.einsum("bld,vd->blv", h, embedding.astype(h.dtype)) + self.bias[...].astype(h.dtype)
    return layers.constrain(logits, ("batch", "length", "act_vocab"))


class TextTransformer(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, vocab_size: int, image_width: int,
               causal_attn: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.word_embed = nnx.Embed(
        vocab_size, cfg.width, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.truncated_normal(0.02), ("vocab", "embed")),
        rngs=rngs)
    self.pos_embed = nnx.Embed(
        cfg.max_len, cfg.width, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.truncated_normal(0.02), (None, "embed")),
        rngs=rngs)
    self.embed_norm = layers.layer_norm(cfg.width, cfg.ln_eps, **kw)
    self.layers = layers.stack(
        lambda r: TextLayer(cfg, image_width, causal_attn, dtype=dtype, param_dtype=param_dtype, rngs=r),
        cfg.depth, rngs, cfg.scan_layers)
    self.lm_head = LMHead(cfg, vocab_size, **kw)
    self.remat, self.scan, self.max_len = cfg.remat, cfg.scan_layers, cfg.max_len

  def embed(self, ids: jax.Array) -> jax.Array:
    """Word + position embeddings, normalised. A position past max_len has no embedding (the
    lookup would read NaN), so a longer text is refused here, for every pass that starts here."""
    if ids.shape[1] > self.max_len:
      raise ValueError(f"{ids.shape[1]} tokens exceed the model's max_len {self.max_len}")
    x = self.word_embed(ids) + self.pos_embed(jnp.arange(ids.shape[1]))[None]
    return self.embed_norm(x)

  def __call__(self, ids: jax.Array, pad_mask: jax.Array, mode: str, image: jax.Array | None = None, *,
               image_index: jax.Array | None = None, first_only: bool = False) -> jax.Array:
    """ids/pad_mask [B, L] (pad_mask True for real tokens) -> hidden states [B, L, width].

    `image` [N, P, Dv] with `image_index` [B]: row b attends to image image_index[b] (each
    image's keys and values projected once however many rows share it); without an index and
    N < B, the rows come in N groups of B / N consecutive rows, group n reading image n
    (`SubLayer`). `first_only`: the last layer computes the first position alone (-> [B, 1,
    width]), all a [CLS]/[ENC] head reads; with scanned layers the whole last layer runs and
    the first position is taken.
    """
    if mode not in MODES:
      raise ValueError(f"unknown text mode {mode!r}; use one of {MODES}")
    decoder = mode == "decoder"
    mask = layers.TextMask(pad_mask, causal=decoder)
    image = None if mode == "text" else image
    x = layers.constrain(self.embed(ids), ("batch", "length", "act_embed"))
    apply = lambda layer, y, m, img, index: layer(y, m, img, decoder, index)
    if not first_only or self.scan:
      x = layers.run_stack(self.layers, x, apply, self.scan, self.remat, mask, image, image_index)
      return x[:, :1] if first_only else x
    *body, last = self.layers
    x = layers.run_stack(body, x, apply, self.scan, self.remat, mask, image, image_index)
    return layers.maybe_remat(lambda layer, y, m, img, index: layer(y, m, img, decoder, index, first_only=True),
                              self.remat)(last, x, mask, image, image_index)

  def prefill(self, ids: jax.Array, pad_mask: jax.Array, image: jax.Array):
    """Decoder pass over [DEC] + ids -> (hidden [B, L, D], per-layer KV cache)."""
    mask = layers.TextMask(pad_mask, causal=True)
    x = self.embed(ids)
    return layers.run_stack_cached(self.layers, x, lambda layer, y, _, m, img: layer.prefill(y, m, img),
                                   self.scan, None, mask, image)

  def empty_cache(self, batch: int, length: int, image: jax.Array):
    """Per-layer decoder caches for generating `length` tokens from scratch (no prefill pass)."""
    _, cache = layers.run_stack_cached(
        self.layers, jnp.zeros(()), lambda layer, x, _, img: (x, layer.empty_cache(batch, length, img)),
        self.scan, None, image)
    return cache

  def cache_rows(self, cache, rows: jax.Array, *, image: bool = True):
    """The decoder cache of rows `rows` [R] of this one: each layer's self-attention keys and
    values, and its image keys/values too unless `image=False` (beams of one image share them)."""
    take = (lambda x: x[:, rows]) if self.scan else (lambda x: x[rows])  # scanned: [layers, B, ...]
    pick = lambda c: (take(c[0]), take(c[1])) + ((take(c[2]), take(c[3])) if image else tuple(c[2:]))
    return pick(cache) if self.scan else tuple(pick(c) for c in cache)

  def step(self, tokens: jax.Array, positions: jax.Array, cache):
    """Next-token logits [B, V] for `tokens` [B] at `positions` [B], and the updated cache."""
    x = self.embed_norm(self.word_embed(tokens[:, None]) + self.pos_embed(positions[:, None]))
    x, cache = layers.run_stack_cached(self.layers, x, lambda layer, y, c: layer.step(y, positions, c),
                                       self.scan, cache)
    return self.logits(x)[:, 0].astype(jnp.float32), cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    return self.lm_head(hidden, self.word_embed.embedding[...])
