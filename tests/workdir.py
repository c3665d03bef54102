"""A workdir as `klip train` leaves it, without training: for tests of the commands that start
from one (relabel, eval, export) whose subject is not the training itself."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from klip_jax import io
from klip_jax.data import prepare
from klip_jax.data.tokenizer import TokenIds
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import checkpoint
from klip_jax.train import state as state_lib


def saved_workdir(config, workdir: str, step: int, params: dict | None = None) -> tuple[dict, TokenIds]:
  """`workdir` with its dataset and tokenizer, config.json and a checkpoint at `step` holding
  `params` (default: the model's own initialisation, config.seed) and a zero optimizer state
  -> (those params, the codec's token ids)."""
  codec = prepare.ensure(config, workdir).codec
  mesh = mesh_lib.from_config(config.mesh)
  tx, _ = state_lib.make_optimizer(config.optim, config.train.steps)
  _, abstract, shardings = state_lib.abstract_state(config, codec.vocab_size, tx, mesh)
  if params is None:
    params = jax.device_get(state_lib.create(config, codec.vocab_size, tx, mesh)[1].params.to_pure_dict())
  state = jax.tree.map(lambda a, s: jax.device_put(np.full(a.shape, step if a.dtype == np.int32 else 0, a.dtype), s),
                       abstract, shardings)
  nnx.replace_by_pure_dict(state.params, jax.tree.map(jax.device_put, params, shardings.params.to_pure_dict()))
  with checkpoint.manager(workdir, config) as manager:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  io.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort())
  return params, TokenIds.from_codec(codec)
