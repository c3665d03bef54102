"""KLIP-large: ViT-L/16 at 224 px + BERT-large (1024 wide, 24 layers, 16 heads)."""

from klip_jax.config import default_config


def get_config(arg=None):
  del arg
  c = default_config()
  c.model.dtype = "bfloat16"
  c.model.vision.update(width=1024, depth=24, heads=16, mlp_dim=4096, remat="dots_no_batch")
  c.model.text.update(width=1024, depth=24, heads=16, mlp_dim=4096, remat="dots_no_batch")
  c.optim.lr = 2e-4
  return c
