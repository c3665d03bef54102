"""The micro scaling sweep: 3 model sizes x 3 data sizes of tiny KLIP on 32 px chips, on 2 CPU
cores in about a quarter of an hour (`klip sweep run --config configs/sweeps/micro.py --workdir W`).

Fixed: configs/tiny.py:32px without the momentum encoder (plain in-batch ITC), batch 16, lr
2e-3, the world's caption noise 0.2, no SCIO. Models m0-m2 scale width and depth of both towers
together (head size 32, MLP 2x width) and their init (std 0.4 / sqrt(width)). Data, as
Chinchilla's approach 3 assumes it: every chip seen once, so the D of `klip sweep fit` (images
seen) is also the number of unique chips along the whole run; the first 1200, 2400 and 4800
train chips of one 4800-chip world, trained for 75, 150 and 300 steps. Held-out loss on the
first 64 val chips at 5 log-spaced steps. Fit it with `klip sweep fit W --floor zero --data
unique_images` (each run's final eval; its losses are far above any irreducible loss).

Variants: `micro.py` (the sweep), `micro.py:repeat` (data-constrained: the first 128, 256 and 512
chips, each model 300 steps, so the small sets are seen up to 37 times; fit it with `--data
unique_images`), `micro.py:test` (the tests': one 16-wide model, 6 steps, a 64-chip world, two
points and one that asks for more chips than the world has)."""

import math
import os

import ml_collections

from klip_jax import config as config_lib


def get_config(arg=None):
  which = config_lib.variant(arg, ("micro", "repeat", "test"))
  s = ml_collections.ConfigDict()
  s.base_config = "tiny.py:32px"  # the shipped config `base` is derived from (--emit-launch diffs against it)
  base = config_lib.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tiny.py")
                         + ":32px")
  base.momentum.update(enabled=False)
  base.optim.update(lr=2e-3, warmup_steps=30, weight_decay=0.01, grad_clip=5.0)
  base.train.update(batch_size=16, log_every=50, ckpt_every=100)
  base.data.synth.update(num_train=4800, num_val=64, num_test=64, noise_rate=0.2)
  base.eval.update(periodic_examples=64, batch_size=64)
  s.base = base
  # init_std = 0.4 / sqrt(width) (as BERT's 0.02 is ~0.55 / sqrt(768)): with tiny.py's fixed 0.1
  # the wider models started too hot and m2 ended behind m1 (0.4 was the best of 0.8, 0.56, 0.4 on
  # m1 at 2400 chips, the three tried; the family's held-out loss then falls with N at every data size).
  s.models = {name: {"width": w, "depth": d, "init_std": round(0.4 / math.sqrt(w), 4)}
              for name, w, d in (("m0", 32, 1), ("m1", 64, 2), ("m2", 96, 3))}
  s.head_dim = 32
  s.mlp_ratio = 2
  s.grid = {}  # the product of model, train_chips, steps, scio and noise lists, when no explicit points
  # {model, train_chips, steps[, scio, noise]}: one pass over each data size.
  s.points = [{"model": m, "train_chips": 16 * steps, "steps": steps} for m in s.models for steps in (75, 150, 300)]
  s.evals = 5  # held-out evaluations per point, log-spaced, the last at the end
  s.scio_fractions = (4 / 6, 1 / 6, 1 / 6)  # stage A, B, C shares of a SCIO point's steps (demo.py's)
  if which == "repeat":
    base.data.synth.num_train = 512
    s.points = []
    s.grid = {"model": ["m0", "m1", "m2"], "train_chips": [128, 256, 512], "steps": [300], "scio": [False],
              "noise": [0.2]}
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
