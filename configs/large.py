"""KLIP-large: ViT-L/16 + BERT-large (1024 wide, 24 layers, 16 heads).

Variants: `large.py` (224 px chips), `large.py:384` (384 px). Scanned towers, as in base.py."""

from klip_jax.config import default_config, variant


def get_config(arg=None):
  c = default_config()
  c.model.vision.image_size = c.data.synth.image_size = int(variant(arg, ("224", "384")))
  c.model.dtype = "bfloat16"
  c.model.vision.update(width=1024, depth=24, heads=16, mlp_dim=4096, remat="dots_no_batch",
                          scan_layers=True)
  c.model.text.update(width=1024, depth=24, heads=16, mlp_dim=4096, remat="dots_no_batch", scan_layers=True)
  c.optim.lr = 2e-4
  return c
