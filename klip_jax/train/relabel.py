"""SCIO's pure relabel step: screen captions with the model's own scores, then proofread.

Screening: for every caption, all leave-one-clause-out variants (a static maximum number of
clauses, absent clauses masked) are scored together with the original in one batched pass,
by ITC similarity and ITM match probability; one pass of the image-grounded decoder over the
caption as written scores each clause's keyword (its surprise: -log p(keyword | image, the
caption before it)). `config.scio.rule` scores each clause, and the best `config.scio.max_flags`
clauses whose score is above zero are flagged (one in the paper; more is an extension):
- "paper": flag a clause only when removing it makes BOTH scores better than the original's;
  among such variants the best-ITC one wins (the next best with more flags);
- "relative" (an extension): each signal's gain from a removal is measured in standard units
  against the caption's other removals; the clause with the best mean of the two is flagged
  when that exceeds `config.scio.threshold`;
- "decoder" (an extension): the clause whose keyword surprises the decoder most, in standard
  units, is flagged when that exceeds `config.scio.threshold`. The decoder is the one head
  trained on every keyword of every caption (masked-keyword reconstruction), so it is the one
  that learns what a clause's value should be for an image; ITC and ITM see a caption as a
  whole, and one wrong clause in eight barely moves them.
Clauses of the fields `config.scio.skip_fields` names (an extension: fields the model cannot
read) are never flagged. With `config.scio.field_calibration` (an extension), each signal is first standardised by its
HCoT field's mean and spread over the batch; without it the "decoder" rule standardises within
the caption, like "relative".

Proofreading: each flagged clause's keyword is rewritten by the image-grounded causal decoder
with a KV cache (`model.decode`): generated left to right until the decoder ends it, or, with
`config.scio.candidates` and a field with a closed vocabulary (`FieldCandidates`), chosen
among the field's values (the current one included) by decoder likelihood. The caption is
re-spliced around the new keyword, so its length may change. With `config.scio.keep_margin`
(an extension), the keyword as written stays unless the rewrite is that many nats likelier.
With `config.scio.rewrite_threshold` (an extension), only flags scoring above that second bar
are rewritten; the clauses of the others are removed from the corrected caption, as stage B
removes every flagged clause: a clause the rule suspects but is not sure of is worth less to
training than no clause, and a rewrite on weak evidence changes clean clauses.
With several flags a caption is rewritten from its first flagged clause to its last, each
rewrite reading the caption before it as already corrected (one more decoder pass over the caption per further flag).

`relabel_step(params, batch, rng) -> RelabelResult` is pure and jitted with the same mesh and
batch sharding as the train step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from klip_jax import config as config_lib
from klip_jax.data import knowledge
from klip_jax.data.tokenizer import TokenIds
from klip_jax.model import decode
from klip_jax.parallel import mesh as mesh_lib


@flax.struct.dataclass
class RelabelResult:
  flagged: jax.Array  # int32 [B, max_flags]: flagged clause indices, best first, -1 past the last
  itc: jax.Array  # [B, 1 + K]: ITC similarity of the original, then of each variant (NaN: not scored)
  itm: jax.Array  # [B, 1 + K]: ITM match probability, same layout
  valid: jax.Array  # bool [B, K]: variant k exists (the caption has clause k)
  score: jax.Array  # [B, K]: the rule's continuous score of removing clause k (flag if best and > 0)
  surprise: jax.Array  # [B, K]: -log p of clause k's keyword under the decoder (0 without one; NaN: not scored)
  removed_ids: jax.Array  # int32 [B, L]: caption without the flagged clauses (original if none)
  removed_keyword_mask: jax.Array
  removed_clause_ids: jax.Array
  corrected_ids: jax.Array  # int32 [B, L]: caption with the flagged keywords rewritten
  corrected_keyword_mask: jax.Array
  corrected_clause_ids: jax.Array
  fill_mask: jax.Array  # bool [B, L]: the corrected caption's rewritten keyword tokens (all flags)
  # bool [B, max_flags]: flag m scored below config.scio.rewrite_threshold, so its clause was
  # removed from the corrected caption instead of rewritten (all False without proofreading)
  dropped: jax.Array


@dataclasses.dataclass(frozen=True)
class FieldCandidates:
  """Closed keyword vocabularies per HCoT field (`knowledge.FIELD_SLOTS` order), as token ids:
  ids [F, C, T] and lengths [F, C] (0: no candidate). A field without a closed vocabulary has
  no candidates, and its keywords are generated freely."""

  ids: np.ndarray
  lengths: np.ndarray


def leave_one_out(ids, keyword_mask, clause_ids, *, separator_id: int, pad_id: int, max_clauses: int):
  """All leave-one-clause-out variants: arrays [B, K, L] and valid [B, K].

  A clause's tokens end with the "$" that closes it; removing the last clause also removes the
  "$" before it. Remaining tokens move left (keeping order) and the tail is padding.
  """
  drop = jnp.broadcast_to(jnp.eye(max_clauses, dtype=bool), (ids.shape[0], max_clauses, max_clauses))
  last = clause_ids.max(axis=1)[:, None]  # never remove a caption's only clause:
  valid = (clause_ids[:, None, :] == jnp.arange(max_clauses)[None, :, None]).any(-1) & (last > 0)
  return (*_without(ids, keyword_mask, clause_ids, drop, separator_id=separator_id, pad_id=pad_id), valid)


def remove_clauses(ids, keyword_mask, clause_ids, flagged, *, separator_id: int, pad_id: int, max_clauses: int):
  """Each caption [B, L] without its `flagged` clauses ([B, M], -1: none), removed as
  leave_one_out removes one: (ids, keyword_mask, clause_ids), each [B, L]."""
  drop = jax.nn.one_hot(flagged, max_clauses, dtype=jnp.int32).sum(1)[:, None, :] > 0  # -1 is no clause
  return tuple(x[:, 0] for x in _without(ids, keyword_mask, clause_ids, drop, separator_id=separator_id,
                                         pad_id=pad_id))


def _without(ids, keyword_mask, clause_ids, drop, *, separator_id: int, pad_id: int):
  """Variants [B, V, L] of each caption without the clauses drop[b, v] ([B, V, K] bool) marks:
  a dropped clause's tokens go with the "$" that closes it, and when the clauses after the
  last kept one are all dropped, that one's closing "$" goes too.
  Kept tokens move left in order; the tail is padding."""
  k = drop.shape[-1]
  cid = clause_ids[:, None, :]
  dropped = jnp.take_along_axis(drop, jnp.clip(cid, 0, k - 1), axis=-1) & (cid >= 0)  # [B, V, L]
  present = (clause_ids[:, None, :, None] == jnp.arange(k)).any(axis=2)  # [B, 1, K]
  last_kept = jnp.max(jnp.where(present & ~drop, jnp.arange(k), -1), axis=-1)[..., None]  # [B, V, 1]
  trailing_dropped = last_kept < clause_ids.max(axis=1)[:, None, None]
  separator = (ids == separator_id)[:, None, :]
  remove = dropped | (separator & (cid == last_kept) & trailing_dropped)
  order = jnp.argsort(remove, axis=-1, stable=True)  # kept tokens first, in order
  kept = jnp.take_along_axis(~remove, order, axis=-1)

  def gather(x, fill):
    x = jnp.broadcast_to(x[:, None, :], remove.shape)
    return jnp.where(kept, jnp.take_along_axis(x, order, axis=-1), fill)

  return gather(ids, pad_id), gather(keyword_mask, 0), gather(clause_ids, -1)


def screen(itc: jax.Array, itm: jax.Array, valid: jax.Array) -> jax.Array:
  """The paper's rule: the flagged clause per caption (-1 for none) from [B, 1 + K] tables."""
  return flag(paper_score(*gains(itc, itm), valid), valid)


def gains(itc: jax.Array, itm: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each score's change [B, K] when clause k is removed, from [B, 1 + K] tables."""
  return itc[:, 1:] - itc[:, :1], itm[:, 1:] - itm[:, :1]


def paper_score(itc_gain: jax.Array, itm_gain: jax.Array, valid: jax.Array) -> jax.Array:
  """The paper's rule as a score [B, K], > 0 exactly where removing clause k raises both ITC
  and ITM, and ordered there by the ITC gain (the paper's choice among such clauses)."""
  both = jnp.minimum(itc_gain, itm_gain)
  rank = jnp.where(both > 0, 1.0 + itc_gain, both)
  return jnp.where(valid, rank, -jnp.inf)


def standardise_by_field(gain: jax.Array, valid: jax.Array, fields: jax.Array, num_fields: int) -> jax.Array:
  """`gain` [B, K] minus its field's batch mean, over its field's batch spread (fields [B, K],
  -1 = unknown, pooled together); a field seen fewer than twice is left centred on the batch."""
  slot = jnp.where(fields >= 0, fields, num_fields)
  onehot = jax.nn.one_hot(slot, num_fields + 1) * valid[..., None]
  count = onehot.sum((0, 1))
  mean = (gain[..., None] * onehot).sum((0, 1)) / jnp.maximum(count, 1)
  var = (jnp.square(gain[..., None] - mean) * onehot).sum((0, 1)) / jnp.maximum(count, 1)
  overall = jnp.sum(jnp.where(valid, gain, 0)) / jnp.maximum(valid.sum(), 1)
  known = count >= 2
  mean = jnp.where(known, mean, overall)
  std = jnp.where(known, jnp.sqrt(var), 1.0)
  return (gain - mean[slot]) / jnp.maximum(std[slot], 1e-6)


def relative_score(gain: jax.Array, valid: jax.Array) -> jax.Array:
  """Each removal's gain [B, K] in standard units of the caption's removals: (g - mean) / std
  over the caption's valid clauses (std floored at a small fraction of the batch's spread, so
  a caption whose removals all score alike does not blow up)."""
  n = jnp.maximum(valid.sum(1, keepdims=True), 1)
  mean = jnp.sum(jnp.where(valid, gain, 0), 1, keepdims=True) / n
  std = jnp.sqrt(jnp.sum(jnp.where(valid, jnp.square(gain - mean), 0), 1, keepdims=True) / n)
  batch_std = jnp.sqrt(jnp.sum(jnp.where(valid, jnp.square(gain - mean), 0)) / jnp.maximum(valid.sum(), 1))
  return (gain - mean) / jnp.maximum(std, 0.1 * batch_std + 1e-9)


def keyword_surprise(token_logp: jax.Array, keyword_mask: jax.Array, clause_ids: jax.Array,
                     max_clauses: int) -> jax.Array:
  """-log p of each clause's keyword [B, K] from the decoder's per-token log-likelihood of the
  caption as written ([B, L], `decode.prefill_caption`): the sum over the keyword's tokens."""
  in_clause = (clause_ids[:, None, :] == jnp.arange(max_clauses)[None, :, None]) & (keyword_mask > 0)[:, None, :]
  return -jnp.sum(jnp.where(in_clause, token_logp[:, None, :], 0.0), axis=-1)


def rule_score(scio: ml_collections.ConfigDict, itc: jax.Array, itm: jax.Array, valid: jax.Array,
               fields: jax.Array, surprise: jax.Array | None = None) -> jax.Array:
  """The configured rule's score [B, K]: the best clause is flagged when its score is > 0
  (`surprise` [B, K], `keyword_surprise`, is what the "decoder" rule reads)."""
  signals = (surprise,) if scio.rule == "decoder" else gains(itc, itm)
  if scio.field_calibration:
    signals = tuple(standardise_by_field(g, valid, fields, len(knowledge.FIELD_SLOTS)) for g in signals)
  if scio.rule == "paper":
    score = paper_score(*signals, valid)
  elif scio.rule == "decoder" and scio.field_calibration:
    score = signals[0] - scio.threshold
  else:
    score = sum(relative_score(g, valid) for g in signals) / len(signals) - scio.threshold
  return jnp.where(valid & ~skipped(scio, fields), score, -jnp.inf)


def skipped(scio: ml_collections.ConfigDict, fields: jax.Array) -> jax.Array:
  """bool [B, K]: clauses of the fields `config.scio.skip_fields` names (never flagged)."""
  names = config_lib.skipped_fields(scio)
  table = jnp.asarray([name in names for name in knowledge.slot_names()] + [False])  # [-1]: no field
  return table[jnp.where(fields >= 0, fields, len(knowledge.FIELD_SLOTS))]


def unsure(scio: ml_collections.ConfigDict, score: jax.Array, flagged: jax.Array) -> jax.Array:
  """bool [B, M]: flags (`flagged` [B, M], -1: none) whose clause scored below
  `config.scio.rewrite_threshold` (in the units of `config.scio.threshold`, which `score`
  [B, K] has been lowered by), to be removed rather than rewritten; none when it is 0."""
  if not scio.rewrite_threshold:
    return jnp.zeros(flagged.shape, bool)
  flag_score = jnp.take_along_axis(score, jnp.maximum(flagged, 0), axis=1)
  return (flagged >= 0) & (flag_score + scio.threshold < scio.rewrite_threshold)


def flag(score: jax.Array, valid: jax.Array) -> jax.Array:
  """The best clause per caption when its score is > 0, else -1: [B]."""
  return flag_best(score, valid, 1)[:, 0]


def flag_best(score: jax.Array, valid: jax.Array, count: int) -> jax.Array:
  """The `count` best clauses per caption [B, count], best first, each only when its score is
  > 0 (-1 past the last)."""
  top, best = jax.lax.top_k(jnp.where(valid, score, -jnp.inf), count)
  return jnp.where(top > 0, best, -1).astype(jnp.int32)


def splice(x: jax.Array, start: jax.Array, old_len: jax.Array, new: jax.Array, new_len: jax.Array,
           fill) -> jax.Array:
  """Rows of `x` [B, L] with x[start : start + old_len] replaced by new[:new_len] ([B, T]);
  the tail shifts and is cut at L or padded with `fill`."""
  length = x.shape[1]
  p = jnp.arange(length)[None]
  start, old_len, new_len = start[:, None], old_len[:, None], new_len[:, None]
  source = p - new_len + old_len
  tail = jnp.where(source < length, jnp.take_along_axis(x, jnp.clip(source, 0, length - 1), 1), fill)
  inserted = jnp.take_along_axis(new, jnp.clip(p - start, 0, new.shape[1] - 1), 1)
  return jnp.where(p < start, x, jnp.where(p < start + new_len, inserted, tail))


def relabel_step_fn(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, tokens: TokenIds,
                    proofread: bool = True, candidates: FieldCandidates | None = None,
                    every_signal: bool = False) -> Callable:
  """The un-jitted relabel step; `proofread=False` (SCIO stage B) skips the decoder rewrite.
  `candidates` (with config.scio.candidates) are the closed vocabularies rewrites choose from.
  `every_signal=False` (training) scores only what the rule reads: under the "decoder" rule
  the 1 + K ITC and ITM passes over the leave-one-out variants, most of a relabel step's work,
  are skipped (itc and itm come back NaN); under the others the keywords' surprise is not
  scored (NaN), and a step that does not proofread then runs no decoder. Evaluation scores
  every signal, to compare them."""
  scio = config.scio
  removal_scores = every_signal or scio.rule != "decoder"
  keyword_scores = every_signal or scio.rule == "decoder"

  def relabel_step(params, batch: dict, rng: jax.Array) -> RelabelResult:
    del rng  # greedy screening and proofreading are deterministic
    model = nnx.merge(graphdef, params)
    ids, keyword_mask, clause_ids = batch["text_ids"], batch["keyword_mask"], batch["clause_ids"]
    b, length = ids.shape
    k = scio.max_clauses
    fields = batch["clause_fields"][:, :k]
    fields = jnp.pad(fields, ((0, 0), (0, k - fields.shape[1])), constant_values=-1)
    var_ids, _, _, valid = leave_one_out(
        ids, keyword_mask, clause_ids, separator_id=tokens.separator, pad_id=tokens.pad, max_clauses=k)
    image_tokens, image_feat = model.encode_image(batch["image"])
    itc = itm = jnp.full((b, k + 1), jnp.nan, jnp.float32)
    if removal_scores:
      all_ids = jnp.concatenate([ids[:, None], var_ids], axis=1).reshape(b * (k + 1), length)
      all_pad = all_ids != tokens.pad
      text_feat = model.encode_text(all_ids, all_pad)
      itc = jnp.einsum("be,bke->bk", image_feat, text_feat.reshape(b, k + 1, -1))
      itm_logits = model.itm_logits(all_ids.at[:, 0].set(tokens.enc), all_pad, image_tokens)  # k + 1 rows each
      itm = jax.nn.softmax(itm_logits, axis=-1)[:, 1].reshape(b, k + 1)
    surprise, cache = jnp.full((b, k), jnp.nan, jnp.float32), None
    if keyword_scores or proofread:
      token_logp, cache = decode.prefill_caption(model, image_tokens, ids, ids != tokens.pad, dec_id=tokens.dec)
    if keyword_scores:
      surprise = keyword_surprise(token_logp, keyword_mask, clause_ids, k)
    score = rule_score(scio, itc, itm, valid, fields, surprise)
    flagged = flag_best(score, valid, scio.max_flags)

    removed = remove_clauses(ids, keyword_mask, clause_ids, flagged, separator_id=tokens.separator,
                             pad_id=tokens.pad, max_clauses=k)
    corrected = (ids, keyword_mask, clause_ids, keyword_span(keyword_mask, clause_ids, flagged))
    dropped = jnp.zeros(flagged.shape, bool)
    if proofread:
      dropped = unsure(scio, score, flagged)
      rewritten = jnp.where(dropped, -1, flagged)
      corrected = rewrite_flags(model, image_tokens, cache, ids, keyword_mask, clause_ids, rewritten, fields,
                                scio=scio, tokens=tokens, candidates=candidates)
      if scio.rewrite_threshold:
        kept = remove_clauses(*corrected[:3], jnp.where(dropped, flagged, -1), separator_id=tokens.separator,
                              pad_id=tokens.pad, max_clauses=k)
        corrected = (*kept, keyword_span(kept[1], kept[2], rewritten))
    return RelabelResult(flagged=flagged, itc=itc, itm=itm, valid=valid, score=score, surprise=surprise,
                         removed_ids=removed[0], removed_keyword_mask=removed[1], removed_clause_ids=removed[2],
                         corrected_ids=corrected[0], corrected_keyword_mask=corrected[1],
                         corrected_clause_ids=corrected[2], fill_mask=corrected[3], dropped=dropped)

  return relabel_step


def keyword_span(keyword_mask: jax.Array, clause_ids: jax.Array, flagged: jax.Array) -> jax.Array:
  """bool [B, L]: the keyword tokens of each caption's flagged clauses (flagged [B, M], -1: none)."""
  hit = (clause_ids[:, :, None] == flagged[:, None, :]) & (flagged >= 0)[:, None, :]
  return (keyword_mask > 0) & hit.any(-1)


def rewrite(model, cache, ids, keyword_mask, clause_ids, flagged, fields, *, scio,
            tokens: TokenIds, candidates: FieldCandidates | None = None):
  """Proofreading: each caption with its flagged clause's keyword (`flagged` [B]) rewritten by
  the decoder (`cache` from `decode.prefill_caption` of `ids`; `fields` [B, K]:
  each clause's FIELD_SLOTS index, for the candidates) -> (ids, keyword_mask, clause_ids); rows
  with flagged < 0 (or without that clause's keyword) come back unchanged."""
  old_span = keyword_span(keyword_mask, clause_ids, flagged[:, None])
  rows = jnp.arange(ids.shape[0])
  has = (flagged >= 0) & old_span.any(1)  # a clause an earlier rewrite pushed past the length is gone
  start = jnp.where(has, jnp.argmax(old_span, axis=1), 1)
  old_len = old_span.sum(1)
  after = ids[rows, jnp.minimum(start + old_len, ids.shape[1] - 1)]  # the token that ends the keyword
  stops = jnp.stack([after, jnp.full_like(after, tokens.separator), jnp.full_like(after, tokens.sep)], 1)
  new, new_len = decode.generate_span(model, cache, ids, start, stops, dec_id=tokens.dec,
                                      banned_ids=tokens.special(),
                                      max_len=scio.max_fill, banned_first_ids=tokens.continuations)
  if scio.candidates and candidates is not None:
    field = jnp.take_along_axis(fields, jnp.maximum(flagged, 0)[:, None], 1)[:, 0]
    slot = jnp.maximum(field, 0)
    cand_ids, cand_len = jnp.asarray(candidates.ids)[slot], jnp.asarray(candidates.lengths)[slot]
    closed = has & (field >= 0) & (cand_len > 0).any(1)
    logp = decode.score_spans(model, cache, ids, start, cand_ids, cand_len, after, dec_id=tokens.dec)
    best = logp.argmax(1)
    width = max(cand_ids.shape[2], new.shape[1])
    pad_to = lambda x: jnp.pad(x, ((0, 0), (0, width - x.shape[1])))
    new = jnp.where(closed[:, None], pad_to(cand_ids[rows, best]), pad_to(new))
    new_len = jnp.where(closed, cand_len[rows, best], new_len)
  if scio.keep_margin > 0:
    new, new_len = keep_written(model, cache, ids, start, old_len, new, new_len, after,
                                margin=scio.keep_margin, dec_id=tokens.dec)
  new_len = jnp.where(has, new_len, old_len)
  new = jnp.where(has[:, None], new, 0)
  spliced = lambda x, fresh, fill: jnp.where(
      has[:, None], splice(x, start, old_len, fresh, new_len, fill), x)
  out_ids = spliced(ids, new, tokens.pad)
  out_kw = spliced(keyword_mask, jnp.ones_like(new), 0)
  out_clause = spliced(clause_ids, jnp.broadcast_to(flagged[:, None], new.shape), -1)
  # A caption that grew past the length ends in [SEP] at the last slot, cut as the tokenizer cuts.
  length = ids.shape[1]
  cut = ((ids != tokens.pad).sum(1) - old_len + new_len > length)[:, None] & (jnp.arange(length) == length - 1)
  out_ids = jnp.where(cut, tokens.sep, out_ids)
  out_kw = jnp.where(cut, 0, out_kw)
  out_clause = jnp.where(cut, -1, out_clause)
  return out_ids, out_kw, out_clause


def keep_written(model, cache, ids, start, old_len, new, new_len, after, *, margin: float, dec_id: int):
  """The rewrite (`new` [B, T], `new_len` [B]) where the decoder finds it more than `margin` nats
  likelier in place than the keyword as written (ids[start : start + old_len]), else the written
  keyword back. Where the decoder hardly prefers another value (a field it cannot read from the
  image), its choice is noise, and a flagged clause that is in fact clean would be changed; the
  margin is the evidence a rewrite needs. A written keyword longer than T tokens (longer than
  any rewrite: scio.max_fill) is not compared, and is rewritten as without a margin."""
  width = new.shape[1]
  offsets = jnp.arange(width)[None]
  written = jnp.where(offsets < old_len[:, None],
                      jnp.take_along_axis(ids, jnp.clip(start[:, None] + offsets, 0, ids.shape[1] - 1), 1), 0)
  logp = decode.score_spans(model, cache, ids, start, jnp.stack([new, written], 1),
                            jnp.stack([new_len, old_len], 1), after, dec_id=dec_id)
  keep = (logp[:, 0] <= logp[:, 1] + margin) & (old_len <= width)
  return jnp.where(keep[:, None], written, new), jnp.where(keep, old_len, new_len)


def rewrite_flags(model, image_tokens, cache, ids, keyword_mask, clause_ids, flagged, fields, *, scio,
                  tokens: TokenIds, candidates: FieldCandidates | None = None):
  """`rewrite` of every flagged clause (`flagged` [B, M], -1: none), the first one in the
  caption first, so each rewrite reads the keywords before it as already corrected; `cache`
  (of `ids`, from the screening pass) serves the first, and the decoder runs again over the
  caption as rewritten for each next one -> (ids, keyword_mask, clause_ids, bool [B, L] the
  new keywords' tokens)."""
  none = jnp.iinfo(jnp.int32).max  # sorts after every clause
  in_order = jnp.sort(jnp.where(flagged >= 0, flagged, none), axis=1)
  clauses = jnp.where(in_order == none, -1, in_order).T  # [M, B]
  out = rewrite(model, cache, ids, keyword_mask, clause_ids, clauses[0], fields, scio=scio, tokens=tokens,
                candidates=candidates)

  def rewrite_next(out, clause):
    _, cache = decode.prefill_caption(model, image_tokens, out[0], out[0] != tokens.pad, dec_id=tokens.dec)
    return rewrite(model, cache, *out, clause, fields, scio=scio, tokens=tokens, candidates=candidates), None

  if len(clauses) > 1:  # a loop, not unrolled: XLA compiles one rewrite for the second flag onwards
    out, _ = jax.lax.scan(rewrite_next, out, clauses[1:])
  return (*out, keyword_span(out[1], out[2], flagged))


def make_relabel_step(config, graphdef, tokens: TokenIds, params_shardings,
                      mesh: jax.sharding.Mesh, proofread: bool = True,
                      candidates: FieldCandidates | None = None, every_signal: bool = False) -> Callable:
  """relabel_step jitted with explicit shardings (params as in training, batch over data axes)."""
  batch = mesh_lib.batch_sharding(mesh)
  return jax.jit(relabel_step_fn(config, graphdef, tokens, proofread, candidates, every_signal),
                 in_shardings=(params_shardings, batch, mesh_lib.replicated(mesh)),
                 out_shardings=batch)
