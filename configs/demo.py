"""The README's main job on a CPU laptop: tiny KLIP, SCIO A -> B -> C on the embedded world
with 20% of caption clauses corrupted; about ten minutes on 2 CPU cores.

Variants: `demo.py` / `demo.py:online` (each batch relabelled right before its step),
`demo.py:offline` (the whole train split relabelled at each stage boundary)."""

import os

from klip_jax import config as config_lib


def get_config(arg=None):
  mode = config_lib.variant(arg, ("online", "offline"))
  c = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
  c.data.synth.update(num_train=1024, num_val=128, num_test=256, noise_rate=0.2, image_size=32)
  c.momentum.update(enabled=False)
  c.optim.update(lr=2e-3, warmup_steps=50, weight_decay=0.01, grad_clip=5.0)
  c.scio.update(mode=mode, stage_a_steps=600, stage_b_steps=150, stage_c_steps=150,
                relabel_batch_size=128)
  c.train.update(steps=900, batch_size=32, log_every=25, ckpt_every=150)
  c.eval.update(every=300)
  return c
