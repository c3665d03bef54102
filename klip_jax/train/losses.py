"""The three FUSAR-KLIP losses: contrast (ITC), matching (ITM) with hard negatives, and
masked-keyword reconstruction through the image-grounded causal decoder.

All functions are pure and operate on GLOBAL arrays: under jit with sharded inputs, the
similarity matrices span the whole global batch (GSPMD inserts the gathers), which is what
makes ITC negatives and ITM hard negatives global, as in BLIP's all-gather.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over rows of -sum(targets * log_softmax(logits))."""
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def itc(image_feat, text_feat, temp, *, image_bank=None, text_bank=None, image_feat_m=None,
        text_feat_m=None, alpha: float | jax.Array = 0.0):
  """Symmetric InfoNCE between L2-normalised image and text features [B, E].

  Without momentum the other modality's online features are the candidates and the targets
  are the identity. With momentum (BLIP/ALBEF), the candidates are `*_bank` = [momentum batch
  features; queue] ([B + Q, E]) and the targets mix in the momentum model's own softmax:
  alpha * softmax(sim_m) + (1 - alpha) * onehot.
  Returns (loss, sim_i2t [B, B], sim_t2i [B, B]) where the similarities are against the
  batch's own candidates (for hard-negative mining and accuracy).
  """
  b = image_feat.shape[0]
  if image_bank is None:
    image_bank, text_bank = image_feat, text_feat
  sim_i2t = image_feat @ text_bank.T / temp
  sim_t2i = text_feat @ image_bank.T / temp
  onehot = jnp.eye(b, sim_i2t.shape[1], dtype=sim_i2t.dtype)
  targets_i2t = targets_t2i = onehot
  if image_feat_m is not None:
    sim_i2t_m = jax.lax.stop_gradient(image_feat_m @ text_bank.T / temp)
    sim_t2i_m = jax.lax.stop_gradient(text_feat_m @ image_bank.T / temp)
    targets_i2t = alpha * jax.nn.softmax(sim_i2t_m, axis=-1) + (1 - alpha) * onehot
    targets_t2i = alpha * jax.nn.softmax(sim_t2i_m, axis=-1) + (1 - alpha) * onehot
  loss = (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2
  return loss, sim_i2t[:, :b], sim_t2i[:, :b]


def itc_accuracy(sim_i2t: jax.Array, sim_t2i: jax.Array) -> jax.Array:
  """Mean top-1 accuracy of image->text and text->image retrieval within the batch."""
  target = jnp.arange(sim_i2t.shape[0])
  return (jnp.mean(sim_i2t.argmax(-1) == target) + jnp.mean(sim_t2i.argmax(-1) == target)) / 2


def sample_hard_negatives(rng: jax.Array, sim_i2t: jax.Array, sim_t2i: jax.Array, random_share: float = 0.0):
  """One negative text per image and one negative image per text, drawn with probability
  proportional to softmax(similarity) over the other items of the batch (positives excluded);
  a `random_share` of the rows draws uniformly instead (an extension: see config.loss).
  Returns (negative text index per image, negative image index per text), each [B]."""
  b = sim_i2t.shape[0]
  diagonal = jnp.eye(b, dtype=bool)
  rng_text, rng_image, rng_share = jax.random.split(rng, 3)
  uniform = jax.random.uniform(rng_share, (b, 1)) < random_share
  sim_i2t, sim_t2i = (
      jax.lax.stop_gradient(jnp.where(diagonal, -jnp.inf, jnp.where(uniform, 0.0, s.astype(jnp.float32))))
      for s in (sim_i2t, sim_t2i))
  return (jax.random.categorical(rng_text, sim_i2t, axis=-1),
          jax.random.categorical(rng_image, sim_t2i, axis=-1))


def itm(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Binary match cross-entropy and accuracy; logits [N, 2], labels [N] in {0, 1}."""
  loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))
  return loss, jnp.mean(logits.argmax(-1) == labels)


def ranking_auc(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """ROC AUC of `scores` [N] for binary `labels` [N]: the share of (positive, negative) pairs
  ordered right, ties counting half (0.5 for a constant score; NaN-free, 0.5 if a class is
  absent). Unlike accuracy at a threshold, it moves while a head still sits at its prior."""
  pos, neg = labels > 0, labels <= 0
  diff = scores[:, None] - scores[None, :]
  wins = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
  pairs = (pos[:, None] & neg[None, :]).astype(jnp.float32)
  count = jnp.sum(pairs)
  return jnp.where(count > 0, jnp.sum(wins * pairs) / jnp.maximum(count, 1.0), 0.5)


def itm_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """ITM as a decision (balanced accuracy of argmax: a head at its prior scores 0.5 whatever
  the batch's share of positives) and as a ranking (AUC of the match logit margin)."""
  pred = logits.argmax(-1)
  pos = labels > 0
  recall_pos = jnp.sum((pred == 1) & pos) / jnp.maximum(jnp.sum(pos), 1)
  recall_neg = jnp.sum((pred == 0) & ~pos) / jnp.maximum(jnp.sum(~pos), 1)
  return {"itm_balanced_acc": (recall_pos + recall_neg) / 2,
          "itm_auc": ranking_auc(logits[:, 1] - logits[:, 0], labels)}


def select_positions(rng: jax.Array, keyword_mask: jax.Array, ordinary_mask: jax.Array,
                     extra_rate: float | jax.Array) -> jax.Array:
  """Positions to reconstruct: every keyword token, plus `extra_rate` of ordinary tokens (a
  scalar, or an array that broadcasts against the [B, L] masks, e.g. one rate per row [B, 1])."""
  extra = jax.random.uniform(rng, keyword_mask.shape) < extra_rate
  return (keyword_mask > 0) | (ordinary_mask & extra)


def keyword_ends(keyword_mask: jax.Array) -> jax.Array:
  """bool [B, L]: the token right after each keyword span (what ends it: the clause's next
  word, "$" or [SEP]). Reconstructing it too teaches the decoder where a keyword stops, which
  variable-length proofreading needs (the paper's loss scores keyword tokens only)."""
  inside = keyword_mask > 0
  return jnp.pad(inside[:, :-1] & ~inside[:, 1:], ((0, 0), (1, 0)))


def random_ordinary_ids(rng: jax.Array, shape, vocab_size: int, special_ids: tuple[int, ...],
                        dtype=jnp.int32) -> jax.Array:
  """Uniform draws over the vocabulary without `special_ids` ([PAD], [SEP], "$", ...): a draw
  over the ordinary count is shifted past each special id at or below it, in ascending order."""
  special = sorted(set(special_ids))
  out = jax.random.randint(rng, shape, 0, vocab_size - len(special), dtype=dtype)
  for s in special:
    out = out + (out >= s).astype(dtype)
  return out


def corrupt(rng: jax.Array, ids: jax.Array, selected: jax.Array, *, mask_id: int,
            vocab_size: int, mask_prob: float, random_prob: float,
            special_ids: tuple[int, ...] = ()) -> jax.Array:
  """BERT-style corruption of the selected tokens: mask_prob -> [MASK], random_prob -> a
  random ordinary token (never one of `special_ids`), the rest kept as they are."""
  rng_choice, rng_token = jax.random.split(rng)
  u = jax.random.uniform(rng_choice, ids.shape)
  random_ids = random_ordinary_ids(rng_token, ids.shape, vocab_size, special_ids, ids.dtype)
  out = jnp.where(selected & (u < mask_prob), mask_id, ids)
  return jnp.where(selected & (u >= mask_prob) & (u < mask_prob + random_prob), random_ids, out)


def _scored(logits: jax.Array, targets: jax.Array, weight: jax.Array):
  """(summed NLL, hits, count) of `targets` under `logits` [..., V] at the weighted positions.
  A hit is a target whose logit is the largest: one max, shared with the log-normaliser,
  instead of an argmax's second pass over the vocabulary (jax.nn.logsumexp takes a max of its
  own: with it demo.py's step ran 0.96x and 0.99x as fast in two paired runs)."""
  logits = logits.astype(jnp.float32)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  log_norm = jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1)) + top
  target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((log_norm - target) * weight), jnp.sum((target >= top) * weight), jnp.sum(weight)


def _mean(nll_sum: jax.Array, hits: jax.Array, count: jax.Array):
  return nll_sum / jnp.maximum(count, 1.0), hits / jnp.maximum(count, 1.0), count


def reconstruction(logits: jax.Array, targets: jax.Array, selected: jax.Array):
  """Causal reconstruction loss counted only at the selected positions.

  logits[:, t] is the decoder's prediction of token t + 1, so position t >= 1 is scored by
  logits[:, t - 1]. Returns (mean loss over selected positions, accuracy, count).
  """
  logits, targets, selected = logits[:, :-1], targets[:, 1:], selected[:, 1:]
  return _mean(*_scored(logits, targets, selected.astype(jnp.float32)))


def reconstruction_at_selected(hidden: jax.Array, to_logits: Callable[[jax.Array], jax.Array],
                               targets: jax.Array, selected: jax.Array):
  """`reconstruction` of the decoder's hidden states [B, L, D], with the vocabulary projection
  `to_logits` run only where a position is scored.

  At small widths the projection to the vocabulary is the step's largest product (tiny.py: 1000
  words against a width of 64), yet the loss reads a third of the positions (the keywords and
  their ends). Each row's selected positions are gathered, in order, into the first half of its
  length; when a row selects more than half, the batch takes the full projection instead
  (lax.cond), so the loss is the same either way. configs/demo.py's captions select 32 of 95
  positions on average and 45 at most."""
  hidden, targets, selected = hidden[:, :-1], targets[:, 1:], selected[:, 1:]
  half = (targets.shape[1] + 1) // 2

  def gathered():
    rows = jnp.argsort(~selected, axis=1, stable=True)[:, :half]  # the selected positions first
    pick = lambda x: jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)
    return _scored(to_logits(pick(hidden)), pick(targets), pick(selected).astype(jnp.float32))

  def full():
    return _scored(to_logits(hidden), targets, selected.astype(jnp.float32))

  return _mean(*jax.lax.cond(jnp.all(selected.sum(axis=1) <= half), gathered, full))
