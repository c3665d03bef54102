"""A small KLIP for speed comparisons on one machine: ViT 384 wide x 6 layers (6 heads, MLP
1536, 224 px, patch 16), text 384 x 6, 128 tokens, batch 16 (issue 12's comparison shape).

Variants: `small.py` (float32: what a CPU computes), `small.py:bf16` (bfloat16 activations)."""

from klip_jax.config import default_config, variant


def get_config(arg=None):
  c = default_config()
  c.model.embed_dim = 256
  c.model.vision.update(image_size=224, patch_size=16, width=384, depth=6, heads=6, mlp_dim=1536)
  c.model.text.update(width=384, depth=6, heads=6, mlp_dim=1536, max_len=128)
  c.data.update(max_len=128)
  c.data.synth.update(image_size=224)
  c.train.update(batch_size=16)
  c.momentum.update(enabled=False)
  if variant(arg, ("fp32", "bf16")) == "bf16":
    c.model.dtype = "bfloat16"
  return c
