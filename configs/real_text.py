"""A shipped config with room for real, LLM-written HCoT captions: 256 text tokens.

The synthetic world's captions fit the shipped lengths (tiny/small: 128, base: 180, the paper's
truncation), but FUSAR-GEOVL-style field text runs 81-226 tokens, and a cut caption loses its
last clauses with their keywords. This sets data.max_len and model.text.max_len (the position
embeddings) to 256; `klip data tokenizer` and `klip train` report the lengths and what a
max_len cuts, so check the report (any length: --config.data.max_len=N --config.model.text.max_len=N).

Variants: `real_text.py:tiny` (default), `real_text.py:small`, `real_text.py:base`, `real_text.py:large`."""

import os

from klip_jax import config as config_lib

MAX_LEN = 256


def get_config(arg=None):
  name = config_lib.variant(arg, ("tiny", "small", "base", "large"))
  c = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py"))
  c.data.max_len = MAX_LEN
  c.model.text.max_len = max(c.model.text.max_len, MAX_LEN)
  return c
