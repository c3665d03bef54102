"""The pure, sharded train step: ITC + ITM (hard negatives) + keyword reconstruction.

`make_train_step` closes over the static parts (graph, optimizer, token ids, loss weights)
and returns `train_step(state, batch, rng) -> (state, metrics)` jitted with explicit in/out
shardings and the state donated. A non-finite loss or gradient leaves the whole state as it
was (params, optimizer, momentum, queues) and is counted in `metrics["skipped"]`.

Batch keys: image [B, H, W, 1]; text_ids, keyword_mask, clause_ids [B, L]. The SCIO stages
may add recon_ids / recon_keyword_mask / recon_clause_ids: the caption the reconstruction
loss is trained on (default: the same caption), and recon_extra_rate [B]: each example's share
of ordinary tokens reconstructed besides the keywords (default: config.loss.extra_mask_rate).
Carried as data rather than config, they let SCIO's three stages run one compiled program
(`scio.reconstruction_inputs`). With config.data.clause_negatives, neg_text_ids
[B, L] is each caption with one clause wrong, an extra ITM negative of its image.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from klip_jax.data.tokenizer import TokenIds
from klip_jax.model.klip import clamp_temperature
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import losses
from klip_jax.train.state import TrainState, momentum_subset, with_momentum

# The batch keys the train and relabel steps read (SCIO may add recon_* keys; clause_fields,
# each clause's knowledge.FIELD_SLOTS index, is the relabel step's).
MODEL_INPUTS = ("image", "text_ids", "keyword_mask", "clause_ids", "clause_fields")
# The reconstruction target's keys and the caption keys each defaults to when a batch has none.
RECON_KEYS = {"recon_ids": "text_ids", "recon_keyword_mask": "keyword_mask", "recon_clause_ids": "clause_ids"}
# The name jax gives the jitted step in its compile events (`compilations.Counter.by_name`).
JIT_NAME = "jit(train_step)"


def model_inputs(batch: dict) -> dict:
  return {k: batch[k] for k in MODEL_INPUTS}


def itm_pair_logits(model, enc_ids, image_tokens, neg_text, neg_image, clause_negatives=None, *, pad_id: int):
  """ITM logits [(3 or 4) B, 2] of the B positives (image b, caption b), then (image
  neg_image[b], caption b), (image b, caption neg_text[b]) and, given, (image b, its clause
  negative b); captions `enc_ids` [B, L] start with [ENC]. Each image's own-image pairs are
  consecutive rows that attend to it together (no copy of its keys/values per pair); only
  the negative-image pairs pick theirs by index."""
  b, length = enc_ids.shape
  own = [enc_ids, enc_ids[neg_text]] + ([] if clause_negatives is None else [clause_negatives])
  own = jnp.stack(own, axis=1).reshape(-1, length)
  own_logits = model.itm_logits(own, own != pad_id, image_tokens).reshape(b, -1, 2)
  neg_image_logits = model.itm_logits(enc_ids, enc_ids != pad_id, image_tokens, neg_image)
  return jnp.concatenate([own_logits[:, 0], neg_image_logits, *jnp.moveaxis(own_logits[:, 1:], 1, 0)])


def _losses(config, tokens: TokenIds, model, momentum_model, state: TrainState, batch, rng):
  """All three losses and their metrics; returns (total, (metrics, momentum features))."""
  rng_itm, rng_select, rng_corrupt = jax.random.split(rng, 3)
  ids = batch["text_ids"]
  pad = ids != tokens.pad
  image_tokens, image_feat = model.encode_image(batch["image"])
  text_feat = model.encode_text(ids, pad)
  temp = model.temperature()

  feats_m = None
  if momentum_model is not None:
    _, image_feat_m = momentum_model.encode_image(batch["image"])
    text_feat_m = momentum_model.encode_text(ids, pad)
    image_feat_m, text_feat_m = jax.lax.stop_gradient((image_feat_m, text_feat_m))
    warmup = max(config.momentum.alpha_warmup_steps, 1)
    alpha = config.momentum.alpha * jnp.minimum(1.0, state.step.astype(jnp.float32) / warmup)
    queued = state.image_queue is not None
    loss_itc, sim_i2t, sim_t2i = losses.itc(
        image_feat, text_feat, temp,
        image_bank=jnp.concatenate([image_feat_m, state.image_queue]) if queued else image_feat_m,
        text_bank=jnp.concatenate([text_feat_m, state.text_queue]) if queued else text_feat_m,
        image_feat_m=image_feat_m, text_feat_m=text_feat_m, alpha=alpha)
    feats_m = (image_feat_m, text_feat_m)
  else:
    loss_itc, sim_i2t, sim_t2i = losses.itc(image_feat, text_feat, temp)

  # ITM: positives, (negative image, text) and (image, negative text) pairs, and with
  # config.data.clause_negatives (image, its caption with one clause wrong) pairs.
  neg_text, neg_image = losses.sample_hard_negatives(rng_itm, sim_i2t, sim_t2i, config.loss.itm_random_negatives)
  clause_negatives = batch["neg_text_ids"].at[:, 0].set(tokens.enc) if "neg_text_ids" in batch else None
  itm_logits = itm_pair_logits(model, ids.at[:, 0].set(tokens.enc), image_tokens, neg_text, neg_image,
                               clause_negatives, pad_id=tokens.pad)
  b = ids.shape[0]
  labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(itm_logits.shape[0] - b, jnp.int32)])
  loss_itm, itm_acc = losses.itm(itm_logits, labels)

  # Keyword reconstruction through the image-grounded causal decoder.
  rec_ids, rec_keywords, rec_clauses = (batch.get(recon, batch[own]) for recon, own in RECON_KEYS.items())
  rec_pad = rec_ids != tokens.pad
  ordinary = (rec_clauses >= 0) & rec_pad
  extra_rate = batch["recon_extra_rate"][:, None] if "recon_extra_rate" in batch else config.loss.extra_mask_rate
  selected = losses.select_positions(rng_select, rec_keywords, ordinary, extra_rate) & rec_pad
  if config.loss.keyword_end:
    selected = selected | (losses.keyword_ends(rec_keywords) & rec_pad)
  selected = selected.at[:, 0].set(False)
  dec_in = losses.corrupt(rng_corrupt, rec_ids, selected, mask_id=tokens.mask,
                          vocab_size=tokens.vocab_size, mask_prob=config.loss.mask_prob,
                          random_prob=config.loss.random_prob,
                          special_ids=tokens.special()).at[:, 0].set(tokens.dec)
  hidden = model.decoder_hidden(dec_in, rec_pad, image_tokens)
  loss_rec, rec_acc, rec_count = losses.reconstruction_at_selected(hidden, model.vocab_logits, rec_ids, selected)

  w = config.loss
  total = w.itc * loss_itc + w.itm * loss_itm + w.recon * loss_rec
  metrics = {"loss": total, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_recon": loss_rec,
             "itc_acc": losses.itc_accuracy(sim_i2t, sim_t2i), "itm_acc": itm_acc,
             "recon_acc": rec_acc, "recon_tokens": rec_count, "temp": temp,
             **losses.itm_metrics(itm_logits, labels)}
  return total, (metrics, feats_m)




def train_step_fn(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, tx, schedule,
                  tokens: TokenIds) -> Callable:
  """The un-jitted step (exposed for tests and ahead-of-time compilation)."""

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    momentum = state.momentum_params is not None

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      momentum_model = None
      if momentum:
        frozen = jax.lax.stop_gradient(state.momentum_params)
        momentum_model = nnx.merge(graphdef, with_momentum(params, frozen))
      return _losses(config, tokens, model, momentum_model, state, batch, rng)

    (loss, (metrics, feats_m)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = clamp_temperature(optax.apply_updates(state.params, updates), config.model.temp_range)
    new = dict(params=params, opt_state=opt_state)
    if momentum:
      applied = tx.has_updated(opt_state) if config.optim.grad_accum > 1 else True
      d = jnp.where(applied, config.momentum.decay, 1.0)
      new["momentum_params"] = jax.tree.map(lambda m, p: d * m + (1 - d) * p,
                                            state.momentum_params, momentum_subset(params))
      if state.image_queue is not None:
        for name, feats in zip(("image_queue", "text_queue"), feats_m):
          new[name] = jax.lax.dynamic_update_slice(getattr(state, name), feats, (state.queue_ptr, 0))
        new["queue_ptr"] = (state.queue_ptr + feats_m[0].shape[0]) % state.image_queue.shape[0]
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    kept = {k: jax.tree.map(lambda n, o: jnp.where(finite, n, o), v, getattr(state, k))
            for k, v in new.items()}
    state = state.replace(step=state.step + 1, skipped=state.skipped + (~finite).astype(jnp.int32), **kept)
    inner_step = state.opt_state.gradient_step if config.optim.grad_accum > 1 else state.step - 1
    metrics.update(grad_norm=grad_norm, lr=schedule(inner_step), nonfinite=(~finite).astype(jnp.float32),
                   skipped=state.skipped.astype(jnp.float32))
    return state, metrics

  return train_step


def eval_step_fn(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, tokens: TokenIds) -> Callable:
  """eval_step(state, batch, rng) -> metrics: the training losses without an update."""

  def eval_step(state: TrainState, batch: dict, rng: jax.Array) -> dict:
    model = nnx.merge(graphdef, state.params)
    momentum_model = None
    if state.momentum_params is not None:
      momentum_model = nnx.merge(graphdef, with_momentum(state.params, state.momentum_params))
    return _losses(config, tokens, model, momentum_model, state, batch, rng)[1][0]

  return eval_step


def heldout_losses_fn(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, tokens: TokenIds) -> Callable:
  """losses(params, batch, rng) -> {loss, loss_itc, loss_itm, loss_recon}: the training losses of
  a batch without an update and without momentum distillation (plain in-batch ITC), so they
  measure the model alone and compare across runs with and without a momentum encoder."""

  def losses_of(params: nnx.State, batch: dict, rng: jax.Array) -> dict:
    metrics = _losses(config, tokens, nnx.merge(graphdef, params), None, None, batch, rng)[1][0]
    return {k: metrics[k] for k in ("loss", "loss_itc", "loss_itm", "loss_recon")}

  return losses_of


def make_train_step(config, graphdef, tx, schedule, tokens: TokenIds, state_shardings,
                    mesh: jax.sharding.Mesh) -> Callable:
  """train_step jitted with explicit shardings; call it inside mesh_lib.logical_context."""
  batch_sharding = mesh_lib.batch_sharding(mesh)
  return jax.jit(train_step_fn(config, graphdef, tx, schedule, tokens),
                 in_shardings=(state_shardings, batch_sharding, mesh_lib.replicated(mesh)),
                 out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
                 donate_argnums=0)
