"""SCIO's pure relabel step: screen captions with the model's own ITC/ITM, then proofread.

Screening: for every caption, all leave-one-clause-out variants (a static maximum number of
clauses, absent clauses masked) are scored together with the original in one batched pass,
by ITC similarity and ITM match probability. A clause is flagged only when removing it makes
BOTH scores better than the original's; among such variants the best-ITC one wins; otherwise
nothing is flagged.

Proofreading: the flagged clause's keyword tokens are filled left to right by the
image-grounded causal decoder with a KV cache (`model.decode.fill_spans`), in the same number
of token slots.

`relabel_step(params, batch, rng) -> RelabelResult` is pure and jitted with the same mesh and
batch sharding as the train step.
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from klip_jax.data.tokenizer import TokenIds
from klip_jax.model import decode
from klip_jax.parallel import mesh as mesh_lib


@flax.struct.dataclass
class RelabelResult:
  flagged: jax.Array  # int32 [B]: flagged clause index, -1 when none
  itc: jax.Array  # [B, 1 + K]: ITC similarity of the original, then of each variant
  itm: jax.Array  # [B, 1 + K]: ITM match probability, same layout
  valid: jax.Array  # bool [B, K]: variant k exists (the caption has clause k)
  removed_ids: jax.Array  # int32 [B, L]: caption without the flagged clause (original if none)
  removed_keyword_mask: jax.Array
  removed_clause_ids: jax.Array
  corrected_ids: jax.Array  # int32 [B, L]: caption with the flagged keyword rewritten
  fill_mask: jax.Array  # bool [B, L]: the token slots that were rewritten


def leave_one_out(ids, keyword_mask, clause_ids, *, separator_id: int, pad_id: int, max_clauses: int):
  """All leave-one-clause-out variants: arrays [B, K, L] and valid [B, K].

  A clause's tokens end with the "$" that closes it; removing the last clause also removes the
  "$" before it. Remaining tokens move left (keeping order) and the tail is padding.
  """
  k = jnp.arange(max_clauses)[None, :, None]
  cid = clause_ids[:, None, :]
  last = clause_ids.max(axis=1)[:, None, None]
  separator = (ids == separator_id)[:, None, :]
  remove = (cid == k) | ((k == last) & (cid == k - 1) & separator & (k > 0))
  order = jnp.argsort(remove, axis=-1, stable=True)  # kept tokens first, in order
  kept = jnp.take_along_axis(~remove, order, axis=-1)

  def gather(x, fill):
    x = jnp.broadcast_to(x[:, None, :], remove.shape)
    return jnp.where(kept, jnp.take_along_axis(x, order, axis=-1), fill)

  valid = (cid == k).any(axis=-1) & (last[..., 0] > 0)  # never remove a caption's only clause
  return gather(ids, pad_id), gather(keyword_mask, 0), gather(clause_ids, -1), valid


def screen(itc: jax.Array, itm: jax.Array, valid: jax.Array) -> jax.Array:
  """The flagged clause per caption (-1 for none) from [B, 1 + K] score tables."""
  better = (itc[:, 1:] > itc[:, :1]) & (itm[:, 1:] > itm[:, :1]) & valid
  best = jnp.where(better, itc[:, 1:], -jnp.inf).argmax(axis=1)
  return jnp.where(better.any(axis=1), best, -1).astype(jnp.int32)


def relabel_step_fn(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, tokens: TokenIds,
                    proofread: bool = True) -> Callable:
  """The un-jitted relabel step; `proofread=False` (SCIO stage B) skips the decoder fill."""
  scio = config.scio

  def relabel_step(params, batch: dict, rng: jax.Array) -> RelabelResult:
    del rng  # greedy screening and proofreading are deterministic
    model = nnx.merge(graphdef, params)
    ids, keyword_mask, clause_ids = batch["text_ids"], batch["keyword_mask"], batch["clause_ids"]
    b, length = ids.shape
    k = scio.max_clauses
    var_ids, var_kw, var_clause, valid = leave_one_out(
        ids, keyword_mask, clause_ids, separator_id=tokens.separator, pad_id=tokens.pad, max_clauses=k)
    all_ids = jnp.concatenate([ids[:, None], var_ids], axis=1).reshape(b * (k + 1), length)
    all_pad = all_ids != tokens.pad
    image_tokens, image_feat = model.encode_image(batch["image"])
    _, text_feat = model.encode_text(all_ids, all_pad)
    itc = jnp.einsum("be,bke->bk", image_feat, text_feat.reshape(b, k + 1, -1))
    repeated = jnp.repeat(image_tokens, k + 1, axis=0)
    itm_logits = model.itm_logits(all_ids.at[:, 0].set(tokens.enc), all_pad, repeated)
    itm = jax.nn.softmax(itm_logits, axis=-1)[:, 1].reshape(b, k + 1)
    flagged = screen(itc, itm, valid)

    chosen = jnp.maximum(flagged, 0)[:, None, None]
    pick = lambda variants, original: jnp.where(
        (flagged >= 0)[:, None], jnp.take_along_axis(variants, chosen, axis=1)[:, 0], original)
    fill_mask = (keyword_mask > 0) & (clause_ids == flagged[:, None]) & (flagged >= 0)[:, None]
    corrected = ids
    if proofread:
      corrected = decode.fill_spans(model, image_tokens, ids, ids != tokens.pad, fill_mask,
                                    dec_id=tokens.dec, banned_ids=tokens.special(), max_fill=scio.max_fill,
                                    banned_first_ids=tokens.continuations)
    return RelabelResult(flagged=flagged, itc=itc, itm=itm, valid=valid,
                         removed_ids=pick(var_ids, ids), removed_keyword_mask=pick(var_kw, keyword_mask),
                         removed_clause_ids=pick(var_clause, clause_ids), corrected_ids=corrected,
                         fill_mask=fill_mask)

  return relabel_step


def make_relabel_step(config, graphdef, tokens: TokenIds, params_shardings,
                      mesh: jax.sharding.Mesh, proofread: bool = True) -> Callable:
  """relabel_step jitted with explicit shardings (params as in training, batch over data axes)."""
  batch = mesh_lib.batch_sharding(mesh)
  return jax.jit(relabel_step_fn(config, graphdef, tokens, proofread),
                 in_shardings=(params_shardings, batch, mesh_lib.replicated(mesh)),
                 out_shardings=batch)
