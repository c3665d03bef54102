"""The micro scaling sweep: 3 model sizes x 3 data sizes of tiny KLIP on 32 px chips, on 2 CPU
cores in ~17 minutes (`klip sweep run --config configs/sweeps/micro.py --workdir W`).

Fixed: configs/tiny.py:32px without the momentum encoder (plain in-batch ITC), batch 16, lr
2e-3, 300 steps, the world's caption noise 0.2, no SCIO. Models m0-m2 scale width and depth of
both towers together (head size 32, MLP 2x width). Data: the first 128, 256 and 512 train chips
of one 512-chip world (9 to 37 epochs: the small sets are seen many times over, which is where
the data-size term shows). Held-out loss on the first 64 val chips at 5 log-spaced steps.

Variants: `micro.py` (the sweep), `micro.py:test` (the tests': one 16-wide model, 6 steps, a
64-chip world, two points and one that asks for more chips than the world has)."""

import os

import ml_collections

from klip_jax import config as config_lib


def get_config(arg=None):
  which = config_lib.variant(arg, ("micro", "test"))
  s = ml_collections.ConfigDict()
  s.base_config = "tiny.py:32px"  # the shipped config `base` is derived from (--emit-launch diffs against it)
  base = config_lib.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tiny.py")
                         + ":32px")
  base.momentum.update(enabled=False)
  base.optim.update(lr=2e-3, warmup_steps=30, weight_decay=0.01, grad_clip=5.0)
  base.train.update(batch_size=16, log_every=50, ckpt_every=100)
  base.data.synth.update(num_train=512, num_val=64, num_test=64, noise_rate=0.2)
  base.eval.update(periodic_examples=64, batch_size=64)
  s.base = base
  s.models = {"m0": {"width": 32, "depth": 1}, "m1": {"width": 64, "depth": 2}, "m2": {"width": 96, "depth": 3}}
  s.head_dim = 32
  s.mlp_ratio = 2
  s.grid = {"model": ["m0", "m1", "m2"], "train_chips": [128, 256, 512], "steps": [300], "scio": [False],
            "noise": [0.2]}
  s.points = []  # an explicit list of {model, train_chips, steps[, scio, noise]} instead of the grid
  s.evals = 5  # held-out evaluations per point, log-spaced, the last at the end
  s.scio_fractions = (4 / 6, 1 / 6, 1 / 6)  # stage A, B, C shares of a SCIO point's steps (demo.py's)
  if which == "test":
    base.train.update(batch_size=8, log_every=2, ckpt_every=2)
    base.data.synth.update(num_train=64, num_val=16, num_test=16)
    base.eval.update(periodic_examples=16, batch_size=16)
    s.models = {"m0": {"width": 16, "depth": 1}}
    s.head_dim = 16
    s.evals = 2
    s.points = [{"model": "m0", "train_chips": 32, "steps": 6}, {"model": "m0", "train_chips": 1000, "steps": 6},
                {"model": "m0", "train_chips": 64, "steps": 6}]
  return s
