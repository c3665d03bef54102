"""KLIP-base as in the paper: ViT-B/16 at 224 px + BERT-base, 180 text tokens."""

from klip_jax.config import default_config


def get_config(arg=None):
  del arg
  c = default_config()  # the defaults are the base model
  c.model.dtype = "bfloat16"
  c.data.max_len = 180
  return c
