"""Train state, optimizer and schedule, and sharded initialisation.

The state is one pytree (params, optimizer state, momentum params, ITC queues, counters) so
it jits, shards, donates and checkpoints as a unit. Initialisation follows MaxText: shapes
from `jax.eval_shape`, shardings from the parameters' logical names under the config's rules,
then a jitted init whose outputs are born sharded (no host ever holds the full model).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from klip_jax.model.klip import KLIP, MOMENTUM_MODULES
from klip_jax.parallel import mesh as mesh_lib

# Parameter leaves that get weight decay: matrices of dense and conv layers only (not biases,
# norms, embeddings, class token, position embeddings or the temperature).
_DECAYED = frozenset({"kernel"})


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []: train_step calls so far
  params: nnx.State
  opt_state: Any
  momentum_params: nnx.State | None  # EMA copy of MOMENTUM_MODULES, None when disabled
  image_queue: jax.Array | None  # [Q, E] momentum image features (None: no queue)
  text_queue: jax.Array | None
  queue_ptr: jax.Array  # int32 []
  skipped: jax.Array  # int32 []: updates skipped because the loss or gradient was not finite


def _param_name(path) -> str:
  keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(keys[-1]) if keys else ""


def decay_mask(params):
  return jax.tree_util.tree_map_with_path(lambda path, _: _param_name(path) in _DECAYED, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
  """AdamW with linear warmup + cosine decay and global-norm clipping; returns (tx, schedule)."""
  updates = max(total_steps // optim.grad_accum, 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, optim.lr, optim.warmup_steps, decay_steps=max(updates, optim.warmup_steps + 1),
      end_value=optim.lr * optim.end_lr_ratio)
  tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                   optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                               weight_decay=optim.weight_decay, mask=decay_mask))
  if optim.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim.grad_accum)
  return tx, schedule


def momentum_subset(params: nnx.State) -> nnx.State:
  return nnx.State({name: params[name] for name in MOMENTUM_MODULES})


def with_momentum(params: nnx.State, momentum_params: nnx.State) -> nnx.State:
  """The full parameter tree with the momentum copies in place of their online modules."""
  merged = {name: params[name] for name in params}
  merged.update({name: momentum_params[name] for name in momentum_params})
  return nnx.State(merged)


def _model(config, vocab_size, rng):
  return KLIP(config.model, vocab_size, rngs=nnx.Rngs(params=rng))


def _init(config, vocab_size, tx, rng) -> TrainState:
  rng_params, rng_queue = jax.random.split(rng)
  params = nnx.state(_model(config, vocab_size, rng_params), nnx.Param)
  momentum = config.momentum.enabled
  queues = (None, None)
  if momentum and config.momentum.queue_size:
    queues = jax.random.normal(rng_queue, (2, config.momentum.queue_size, config.model.embed_dim))
    queues = queues / jnp.maximum(jnp.linalg.norm(queues, axis=-1, keepdims=True), 1e-12)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      momentum_params=jax.tree.map(jnp.copy, momentum_subset(params)) if momentum else None,
      image_queue=queues[0], text_queue=queues[1], queue_ptr=jnp.zeros((), jnp.int32),
      skipped=jnp.zeros((), jnp.int32))


def abstract_state(config, vocab_size: int, tx, mesh):
  """(graphdef, shape-only train state, shardings): what a restore or AOT compile needs."""
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    model = nnx.eval_shape(lambda: _model(config, vocab_size, jax.random.key(0)))
    graph = nnx.split(model, nnx.Param)[0]
    abstract = jax.eval_shape(lambda: _init(config, vocab_size, tx, jax.random.key(0)))
    return graph, abstract, mesh_lib.divisible(nnx.get_named_sharding(abstract, mesh), abstract)


def create(config, vocab_size: int, tx, mesh) -> tuple[nnx.GraphDef, TrainState, Any]:
  """(graphdef, freshly initialised sharded train state, its shardings), seeded by config.seed."""
  graph, _, shardings = abstract_state(config, vocab_size, tx, mesh)
  return graph, initialise(config, vocab_size, tx, mesh, shardings), shardings


def initialise(config, vocab_size: int, tx, mesh, shardings) -> TrainState:
  """A freshly initialised train state, seeded by config.seed, made in place with `shardings`
  (`abstract_state`'s: a caller that has them skips building the model's shapes again)."""
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    init = jax.jit(lambda rng: _init(config, vocab_size, tx, rng), out_shardings=shardings)
    return init(jax.random.key(config.seed))
