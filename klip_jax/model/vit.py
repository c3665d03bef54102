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
import numpy as np
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


def _torch_bicubic_weights(old: int, new: int) -> np.ndarray:
  """[new, old] matrix of torch's 1-d bicubic resize (align_corners=False): cubic convolution
  with A = -0.75 at source (i + 0.5) * old / new - 0.5, edge taps clamped, no antialiasing."""
  a = -0.75
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  source = (np.arange(new) + 0.5) * old / new - 0.5
  first = np.floor(source)
  t = source - first
  taps = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  weights = np.zeros((new, old))
  index = np.clip(first[:, None].astype(int) + np.arange(-1, 3), 0, old - 1)
  np.add.at(weights, (np.repeat(np.arange(new), 4), index.ravel()), taps.ravel())
  return weights


def interpolate_positions(pos: jax.Array, grid: int) -> jax.Array:
  """[1, 1 + g*g, D] position embeddings -> [1, 1 + grid*grid, D] (class token kept).

  Resized as BLIP (ALBEF's interpolate_pos_embed) and HF BLIP's interpolate_pos_encoding do,
  with torch's bicubic, so an exported model fed another resolution, or an imported checkpoint of
  another size, gets PyTorch's embeddings: jax.image.resize's bicubic (A = -0.5, antialiased
  when shrinking) differed from it by up to 2 on unit-scale embeddings (a 24x24 grid to 14x14)."""
  old = round((pos.shape[1] - 1) ** 0.5)
  if old == grid:
    return pos
  weights = jnp.asarray(_torch_bicubic_weights(old, grid), pos.dtype)
  patches = jnp.einsum("ih,jw,hwd->ijd", weights, weights, pos[0, 1:].reshape(old, old, -1),
                       precision=jax.lax.Precision.HIGHEST)
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
