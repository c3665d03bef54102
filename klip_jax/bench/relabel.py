"""SCIO relabelling speed: captions screened (leave-one-clause-out ITC and ITM) and proofread
(the flagged keyword rewritten by the decoder) per second, by the jitted relabel step; with
`compare_hf`, a straightforward PyTorch implementation of the same on transformers' BLIP
modules (`hf_blip.relabeller`), timed in the same rounds. Both run the paper's rule with free
(not candidate-ranked) rewrites, so they do the same work."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from klip_jax.bench import hf_blip, inputs, timing
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import relabel
from klip_jax.train import step as step_lib


def throughput(config: ml_collections.ConfigDict, vocab_size: int, *, batch_size: int | None = None,
               rounds: int = 5, compare_hf: bool = False) -> dict:
  config = config.copy_and_resolve_references()
  config.scio.update(rule="paper", field_calibration=False, candidates=False, max_flags=1)
  b = batch_size or config.scio.relabel_batch_size
  mesh, graph, state, shardings, _, _ = inputs.fresh_model(config, vocab_size)
  tokens = inputs.token_ids(vocab_size)
  batch = inputs.random_batch(config, vocab_size, batch_size=b)
  model_batch = step_lib.model_inputs(batch)
  flagged = {}
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    step = relabel.make_relabel_step(config, graph, tokens, shardings.params, mesh)

    def ours():
      result = step(state.params, model_batch, jax.random.key(0))
      flagged["klip_jax"] = np.asarray(jax.device_get(result.flagged))[:, 0]  # the paper's one flag

    contenders = {"klip_jax": ours}
    if compare_hf:
      module = hf_blip.build(config.model, vocab_size, tokens)
      hf_blip.load_params(module, jax.device_get(state.params.to_pure_dict()), config.model)
      run = hf_blip.relabeller(module, tokens, max_clauses=config.scio.max_clauses, max_fill=config.scio.max_fill)

      def hf():
        flagged["hf"] = run(batch)[0]

      contenders["hf"] = hf
    seconds = timing.interleaved(contenders, rounds=rounds)
  result = {"config": {"batch_size": b, "max_clauses": config.scio.max_clauses, "max_fill": config.scio.max_fill,
                       "text_len": config.data.max_len, "devices": mesh.size}, "rounds": rounds,
            "klip_jax": {"captions_per_s": b / seconds["klip_jax"],
                         "flagged_share": float((flagged["klip_jax"] >= 0).mean())}}
  if compare_hf:
    result["hf"] = {"captions_per_s": b / seconds["hf"], "flagged_share": float((flagged["hf"] >= 0).mean())}
    result["ratio"] = seconds["hf"] / seconds["klip_jax"]
    # Same weights on both sides: the flags agree but where two gains tie within rounding.
    result["flags_agree"] = float((flagged["hf"] == flagged["klip_jax"]).mean())
  return result
