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
                                 std=cfg.init_std, **kw)
    self.norm = layers.layer_norm(cfg.width, cfg.ln_eps, **kw)

  def __call__(self, x, context=None, mask=None):
    return self.norm(x + self.attn(x, context, mask))


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

  def __call__(self, x, self_mask, image=None, decoder=False):
    attn = self.causal_attn if (decoder and self.causal_attn is not None) else self.self_attn
    x = attn(x, mask=self_mask)
    if image is not None:
      x = self.cross_attn(x, context=image)
    h = layers.constrain(self.act(self.fc1(x)), ("batch", "length", "act_mlp"))
    x = self.ffn_norm(x + self.fc2(h))
    return layers.constrain(x, ("batch", "length", "act_embed"))


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

  def embed(self, ids: jax.Array, offset: int | jax.Array = 0) -> jax.Array:
    positions = offset + jnp.arange(ids.shape[1])
    x = self.word_embed(ids) + self.pos_embed(positions)[None]
    return self.embed_norm(x)

  def __call__(self, ids: jax.Array, pad_mask: jax.Array, mode: str,
               image: jax.Array | None = None) -> jax.Array:
    """ids/pad_mask [B, L] (pad_mask True for real tokens) -> hidden states [B, L, width]."""
    if mode not in MODES:
      raise ValueError(f"unknown text mode {mode!r}; use one of {MODES}")
    if ids.shape[1] > self.max_len:
      raise ValueError(f"{ids.shape[1]} tokens exceed the model's max_len {self.max_len}")
    decoder = mode == "decoder"
    mask = pad_mask[:, None, None, :]
    if decoder:
      mask = mask & jnp.tril(jnp.ones((ids.shape[1], ids.shape[1]), bool))[None, None]
    image = None if mode == "text" else image
    x = layers.constrain(self.embed(ids), ("batch", "length", "act_embed"))
    return layers.run_stack(self.layers, x, lambda layer, y, m, img: layer(y, m, img, decoder),
                            self.scan, self.remat, mask, image)

  def logits(self, hidden: jax.Array) -> jax.Array:
    return self.lm_head(hidden, self.word_embed.embedding[...])
