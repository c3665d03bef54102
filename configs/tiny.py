"""Tiny KLIP for tests and a CPU demo: 32 px chips, 2-layer towers of width 64.

Variants: `tiny.py` (32 px), `tiny.py:48px` (the tests' 48 px chips, 6x6 patches)."""

from klip_jax.config import default_config, variant


def get_config(arg=None):
  size = {"32px": 32, "48px": 48}[variant(arg, ("32px", "48px"))]
  c = default_config()
  c.model.embed_dim = 32
  # BERT's 0.02 init suits 768-wide layers; at width 64 it starves cross-attention of signal.
  c.model.vision.update(image_size=size, patch_size=8, width=64, depth=2, heads=2, mlp_dim=128, init_std=0.1)
  c.model.text.update(width=64, depth=2, heads=2, mlp_dim=128, max_len=128, init_std=0.1)
  c.momentum.update(queue_size=64, alpha_warmup_steps=50)
  c.optim.update(lr=1e-3, warmup_steps=20, weight_decay=0.01)
  c.train.update(steps=200, batch_size=16, log_every=10, ckpt_every=100, keep=2)
  c.data.update(vocab_size=1000, max_len=128)
  c.eval.update(caption_steps=300, caption_lr=1e-3, detection_steps=300, every=100)
  c.data.synth.update(num_train=512, num_val=64, num_test=64, image_size=size)
  return c
