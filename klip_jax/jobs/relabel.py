"""`klip relabel`: one SCIO round over a split with a workdir's latest checkpoint, written as
the next caption overlay (never overwriting an earlier round)."""

from __future__ import annotations

import ml_collections

from klip_jax.data import prepare
from klip_jax.data.tokenizer import TokenIds
from klip_jax.parallel import hosts
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import checkpoint, scio


def relabel(config: ml_collections.ConfigDict, workdir: str, split: str, *, progress: bool = True) -> dict:
  """Relabel `split`; returns the round, its overlay path, the step and the repair metrics."""
  # Every process picks the round before any can write one: listing after the relabelling let
  # a process that finished late see process 0's new round and pick the next one.
  round_index = max(scio.rounds(workdir), default=0) + 1
  hosts.sync("relabel: round chosen")
  data = prepare.locate(config, workdir)
  prepare.check_chip_size(config, data.data_dir)
  mesh = mesh_lib.from_config(config.mesh)
  graph, state = checkpoint.restore(config, workdir, data.codec.vocab_size, mesh)
  relabel_step = scio.restored_relabel_step(config, graph, state.params, TokenIds.from_codec(data.codec), mesh, data)
  entries = scio.relabel_restored(config, relabel_step, state.params, data, split, mesh, progress=progress)
  return {"round": round_index, "path": scio.write_overlay(workdir, round_index, entries),
          "step": int(state.step), "captions": len(entries),
          "metrics": scio.repair_metrics(entries, config.scio.max_flags)}
