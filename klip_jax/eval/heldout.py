"""Held-out loss: the training objective's three losses on examples the model never trained on,
the quantity scaling laws are fitted to (`klip sweep`).

The same examples every time: the evaluated split in order, cut into whole batches of the
training batch size (ITC's in-batch negatives and ITM's hard negatives depend on the batch, so
its size and make-up are fixed and no padding rows join it), each caption the TRUE text (the
caption noise undone, `eval.truth`: what the image shows), and one fixed rng for ITM's negative
sampling and the reconstruction masking. Two evaluations of the same parameters give the same
numbers, and every run evaluated on the same split sees the same batches.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from klip_jax.data.records import true_text
from klip_jax.data.tokenizer import TextCodec
from klip_jax.errors import ConfigError
from klip_jax.eval.runner import ModelRunner
from klip_jax.eval.truth import Split
from klip_jax.parallel import hosts
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import step as step_lib


def batches(split: Split, codec: TextCodec, batch_size: int) -> list[dict]:
  """The split's first whole batches of model inputs (true captions); a remainder is left out."""
  count = len(split) // batch_size * batch_size
  if not count:
    raise ConfigError(f"the held-out loss needs at least one batch of train.batch_size={batch_size} "
                      f"examples but the {split.name} split gives {len(split)}; raise eval.periodic_examples "
                      "(or the split's size, e.g. data.synth.num_val) or lower the batch size.")
  encoded = [codec.encode(caption, spans) for _, caption, spans in map(true_text, split.records[:count])]
  inputs = {"image": split.images[:count],
            "text_ids": np.stack([e.ids for e in encoded]),
            "keyword_mask": np.stack([e.keyword_mask for e in encoded]),
            "clause_ids": np.stack([e.clause_ids for e in encoded])}
  return [{k: v[s:s + batch_size] for k, v in inputs.items()} for s in range(0, count, batch_size)]


def evaluate(config: ml_collections.ConfigDict, runner: ModelRunner, split: Split, codec: TextCodec) -> dict:
  """{itc, itm, reconstruction, total, examples}: each loss averaged over the batches; total
  weights them as training does (config.loss)."""
  losses = runner.jitted("heldout_loss", lambda: step_lib.heldout_losses_fn(config, runner.graph, runner.tokens))
  rng = jax.random.key(config.eval.seed)
  sums: dict[str, float] = {}
  shown = batches(split, codec, config.train.batch_size)
  with mesh_lib.logical_context(runner.mesh, runner.rules):
    for index, batch in enumerate(shown):
      out = hosts.fetch(losses(runner.params, hosts.from_host(batch, mesh_lib.batch_sharding(runner.mesh)),
                               jax.random.fold_in(rng, index)))
      for name, value in out.items():
        sums[name] = sums.get(name, 0.0) + float(value)
  mean = {name: total / len(shown) for name, total in sums.items()}
  return {"itc": mean["loss_itc"], "itm": mean["loss_itm"], "reconstruction": mean["loss_recon"],
          "total": mean["loss"], "examples": len(shown) * config.train.batch_size}
