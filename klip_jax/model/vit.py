"""The SAR image encoder: a pre-LN ViT over single-channel chips (BLIP's vision tower).

SAR is one coherent channel, so the patch embedding reads one channel; exporting to a
3-channel RGB model divides the kernel by three across channels, which gives the same
features for a grey image replicated to RGB. Position embeddings are learned at the config's
image size and bicubically interpolated when a batch has another resolution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from klip_jax.model import layers


class VisionBlock(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = layers.layer_norm(cfg.width, cfg.ln_eps, **kw)
    self.attn = layers.Attention(cfg.width, cfg.heads, fused_qkv=cfg.fused_qkv, std=cfg.init_std,
                                 implementation=cfg.attention, **kw)
    self.norm2 = layers.layer_norm(cfg.width, cfg.ln_eps, **kw)
    self.mlp = layers.Mlp(cfg.width, cfg.mlp_dim, approximate_gelu=cfg.approximate_gelu,
                          std=cfg.init_std, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    x = x + self.mlp(self.norm2(x))
    return layers.constrain(x, ("batch", "length", "act_embed"))


def interpolate_positions(pos: jax.Array, grid: int) -> jax.Array:
  """[1, 1 + g*g, D] position embeddings -> [1, 1 + grid*grid, D] (class token kept)."""
  old = round((pos.shape[1] - 1) ** 0.5)
  if old == grid:
    return pos
  patches = pos[:, 1:].reshape(1, old, old, -1)
  patches = jax.image.resize(patches, (1, grid, grid, patches.shape[-1]), method="bicubic")
  return jnp.concatenate([pos[:, :1], patches.reshape(1, grid * grid, -1)], axis=1)


class VisionEncoder(nnx.Module):
  """[B, H, W, 1] normalised SAR -> [B, 1 + (H/p)*(W/p), width] tokens (class token first)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
    if cfg.image_size % cfg.patch_size:
      raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    self.patch_size, self.remat, self.scan = cfg.patch_size, cfg.remat, cfg.scan_layers
    self.patch_embed = nnx.Conv(
        1, cfg.width, kernel_size=(cfg.patch_size, cfg.patch_size), strides=cfg.patch_size,
        padding="VALID", dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.truncated_normal(0.02), (None, None, None, "embed")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)), rngs=rngs)
    num = (cfg.image_size // cfg.patch_size) ** 2
    init = nnx.with_partitioning(nnx.initializers.truncated_normal(0.02), (None, None, "embed"))
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, cfg.width), param_dtype))
    self.pos_embed = nnx.Param(init(rngs.params(), (1, 1 + num, cfg.width), param_dtype))
    self.blocks = layers.stack(
        lambda r: VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.depth, rngs,
        cfg.scan_layers)
    self.norm = layers.layer_norm(cfg.width, cfg.ln_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, images: jax.Array) -> jax.Array:
    b, h, w, _ = images.shape
    if h != w or h % self.patch_size:
      raise ValueError(f"images must be square multiples of {self.patch_size} pixels, got {h}x{w}")
    x = self.patch_embed(images.astype(self.dtype)).reshape(b, -1, self.cls_token.shape[-1])
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + interpolate_positions(self.pos_embed[...], h // self.patch_size).astype(x.dtype)
    x = layers.constrain(x, ("batch", "length", "act_embed"))
    x = layers.run_stack(self.blocks, x, lambda block, y: block(y), self.scan, self.remat)
    return self.norm(x)
