"""The composed KLIP model: SAR ViT + MED text transformer + ITC projections, ITM head,
learnable temperature. The momentum (EMA) copy is not a second module: it is a second
parameter pytree for the same graph (see `MOMENTUM_MODULES`), merged in when the momentum
features are needed, so the model code stays pure tensors-in tensors-out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from klip_jax.model import layers
from klip_jax.model.text import TextTransformer
from klip_jax.model.vit import VisionEncoder

# Submodules whose parameters have a momentum (EMA) copy, as in BLIP/ALBEF.
MOMENTUM_MODULES = ("vision", "text", "vision_proj", "text_proj")


def _normalise(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def clamp_temperature(params: nnx.State, temp_range: tuple[float, float]) -> nnx.State:
  """`params` with the temperature parameter clipped to `temp_range` (after an optimizer step)."""
  lo, hi = temp_range

  def clamp(path, x):
    return jnp.clip(x, lo, hi).astype(x.dtype) if getattr(path[0], "key", None) == "temp" else x
  return jax.tree_util.tree_map_with_path(clamp, params)


class KLIP(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, vocab_size: int, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vision = VisionEncoder(cfg.vision, **kw)
    self.text = TextTransformer(cfg.text, vocab_size, cfg.vision.width,
                                causal_attn=cfg.share_decoder, **kw)
    self.decoder = None if cfg.share_decoder else TextTransformer(
        cfg.text, vocab_size, cfg.vision.width, causal_attn=False, **kw)
    self.vision_proj = layers.dense(cfg.vision.width, cfg.embed_dim, ("embed", None),
                                    std=cfg.vision.init_std, **kw)
    self.text_proj = layers.dense(cfg.text.width, cfg.embed_dim, ("embed", None), std=cfg.text.init_std, **kw)
    self.itm_head = layers.dense(cfg.text.width, 2, ("embed", None), std=cfg.text.init_std, **kw)
    self.temp = nnx.Param(jnp.asarray(cfg.temp_init, param_dtype))

  def temperature(self) -> jax.Array:
    """The ITC temperature. Kept inside `temp_range` by clamping the parameter after each
    update (`clamp_temperature`), as BLIP does: clipping it here instead would zero its gradient
    for good once an update pushed it out of range."""
    return self.temp[...].astype(jnp.float32)

  def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (image tokens [B, N, Dv], L2-normalised ITC feature [B, E] in fp32)."""
    tokens = self.vision(images)
    return tokens, _normalise(self.vision_proj(tokens[:, 0]))

  def encode_text(self, ids: jax.Array, pad_mask: jax.Array) -> jax.Array:
    """Unimodal text ([CLS] first) -> normalised ITC feature [B, E] in fp32."""
    cls = self.text(ids, pad_mask, "text", first_only=True)[:, 0]
    return _normalise(self.text_proj(cls))

  def itm_logits(self, ids: jax.Array, pad_mask: jax.Array, image_tokens: jax.Array,
                 image_index: jax.Array | None = None) -> jax.Array:
    """Image-grounded encoder ([ENC] first) -> match/no-match logits [B, 2] in fp32; row b
    pairs with image_tokens[image_index[b]]; without an index, with image_tokens[b] or, for
    N < B images, the B / N consecutive rows of each image with it (`TextTransformer`)."""
    hidden = self.text(ids, pad_mask, "multimodal", image_tokens, image_index=image_index, first_only=True)
    return self.itm_head(hidden[:, 0]).astype(jnp.float32)

  def decoder_tower(self) -> TextTransformer:
    return self.text if self.decoder is None else self.decoder

  def decoder_hidden(self, ids: jax.Array, pad_mask: jax.Array, image_tokens: jax.Array) -> jax.Array:
    """Image-grounded causal decoder ([DEC] first) -> hidden states [B, L, width]."""
    return self.decoder_tower()(ids, pad_mask, "decoder", image_tokens)

  def vocab_logits(self, hidden: jax.Array) -> jax.Array:
    """Decoder hidden states [..., width] -> next-token logits [..., V] in fp32."""
    return self.decoder_tower().logits(hidden).astype(jnp.float32)

  def decoder_logits(self, ids: jax.Array, pad_mask: jax.Array, image_tokens: jax.Array) -> jax.Array:
    """Image-grounded causal decoder ([DEC] first) -> next-token logits [B, L, V] in fp32."""
    return self.vocab_logits(self.decoder_hidden(ids, pad_mask, image_tokens))
