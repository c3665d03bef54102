"""Image captioning: the image-grounded decoder writes a caption for each held-out chip
(KV-cached greedy and beam search), scored by BLEU-4 and CIDEr-D against the true caption.

Pretraining teaches the decoder only the keywords (masked-keyword reconstruction, not full
caption language modelling), so captioning is fine-tuned first, as BLIP and the paper do:
a fixed number of steps of the language-modelling loss on every token of the train captions,
the same recipe for the trained model and the random-init baseline. `klip finetune caption`
saves the trained model's fine-tune (the one `klip export` ships); the benchmark then scores
those saved parameters instead of fine-tuning again, so the report and the export agree.

The chance level is what a caption that ignores the image scores: the true caption of a
random training chip (fixed seed) put forward for each test chip. Template captions share
most of their words, so that floor is far above zero, and the gap to it is the part of the
score that comes from seeing the image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from klip_jax.data.tokenizer import TextCodec
from klip_jax.eval import metrics
from klip_jax.eval.runner import ModelRunner
from klip_jax.eval.truth import Split
from klip_jax.parallel import hosts
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import losses


def finetune(runner: ModelRunner, train: Split, *, steps: int, lr: float, seed: int):
  """Parameters after `steps` AdamW steps (warmup + cosine) of caption language modelling
  on random batches of the train split; the runner's own parameters are left untouched."""
  graph, tokens = runner.graph, runner.tokens
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), max(steps, 2))
  tx = optax.adamw(schedule, weight_decay=0.05)

  def loss_fn(params, images, ids):
    model = nnx.merge(graph, params)
    image_tokens, _ = model.encode_image(images)
    real = ids != tokens.pad
    logits = model.decoder_logits(ids.at[:, 0].set(tokens.dec), real, image_tokens)
    return losses.reconstruction(logits, ids, real)[0]

  def update(params, opt_state, images, ids):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, ids)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = runner.jitted(f"caption_finetune_{steps}_{lr}", lambda: update)

  rng = np.random.default_rng(seed)
  params = jax.tree.map(jnp.copy, runner.params)
  with mesh_lib.logical_context(runner.mesh, runner.rules):
    opt_state = tx.init(params)
    for _ in tqdm(range(steps), desc="caption fine-tune", unit="step", leave=False):
      rows = rng.choice(len(train), runner.batch_size, replace=len(train) < runner.batch_size)
      images, ids = hosts.from_host((train.images[rows], train.text_ids[rows]),
                                    mesh_lib.batch_sharding(runner.mesh))
      params, opt_state, _ = step(params, opt_state, images, ids)
  return params


def score(runner: ModelRunner, codec: TextCodec, test: Split, train: Split,
          config: ml_collections.ConfigDict) -> tuple[dict, list[dict]]:
  """`evaluate` on the first `config.eval.caption_examples` test chips (0: all), as the
  benchmark scores a (fine-tuned) captioner."""
  e = config.eval
  shown = test.head(e.caption_examples or len(test))
  return evaluate(runner, codec, shown, runner.encode_images(shown.images)[0], train.captions,
                  max_len=codec.max_len, beam_size=e.beam_size, seed=e.seed)


def evaluate(runner: ModelRunner, codec: TextCodec, test: Split, image_tokens: np.ndarray,
             train_captions: list[str], *, max_len: int, beam_size: int, seed: int) -> tuple[dict, list[dict]]:
  """(metrics, per-image captions) for greedy and beam decoding."""
  references = [[c] for c in test.captions]
  out, captions = {}, {}
  for name, beam in (("greedy", 1), ("beam", beam_size)):
    ids = runner.generate(image_tokens, max_len=max_len, beam_size=beam)
    captions[name] = [codec.decode(row) for row in ids]
    for metric, value in metrics.caption_scores(captions[name], references).items():
      out[f"{name}_{metric}"] = value
  rng = np.random.default_rng(seed)
  blind = [train_captions[i] for i in rng.integers(len(train_captions), size=len(test))]
  for metric, value in metrics.caption_scores(blind, references).items():
    out[f"chance_{metric}"] = value
  out["beam_size"] = beam_size
  out["num_images"] = len(test)
  rows = [{"id": r["id"], "reference": ref[0], "greedy": g, "beam": b}
          for r, ref, g, b in zip(test.records, references, captions["greedy"], captions["beam"])]
  return out, rows
