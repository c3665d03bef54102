"""KLIP-base as in the paper: ViT-B/16 + BERT-base, 180 text tokens.

Variants: `base.py` (224 px chips), `base.py:384` (384 px, BLIP's fine-tuning resolution).

The towers are scanned (one layer's program, parameters stacked on a "layers" axis), as pods
run deep stacks: the compiler sees one layer body instead of twelve (the unrolled train step
took the TPU compiler ~24 min on a 2-core CPU host; scanned, a layout that does not fit the
HBM is refused within ~15 s)."""

from klip_jax.config import default_config, variant


def get_config(arg=None):
  c = default_config()  # the defaults are the base model
  c.model.vision.image_size = c.data.synth.image_size = int(variant(arg, ("224", "384")))
  c.model.dtype = "bfloat16"
  c.data.max_len = 180
  c.model.vision.scan_layers = c.model.text.scan_layers = True
  return c
