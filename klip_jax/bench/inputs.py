"""What the benchmarks run on: a freshly initialised model and random inputs of a config's
shapes. Timings do not depend on the values, only on shapes (captions with the clause
structure SCIO reads, so relabelling does its real work), so no dataset is needed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from klip_jax.data.tokenizer import TokenIds
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import state as state_lib

SPECIAL = 8  # ids below this are special pieces in `token_ids`


def token_ids(vocab_size: int) -> TokenIds:
  return TokenIds(pad=0, cls=4, enc=5, dec=2, mask=6, sep=3, separator=7, vocab_size=vocab_size)


def batch_shapes(config: ml_collections.ConfigDict, batch_size: int | None = None) -> dict:
  """(shape, dtype) of each batch key the train and relabel steps read (step.MODEL_INPUTS)."""
  b, size, length = batch_size or config.train.batch_size, config.model.vision.image_size, config.data.max_len
  return {"image": ((b, size, size, 1), jnp.float32), "text_ids": ((b, length), jnp.int32),
          "keyword_mask": ((b, length), jnp.int32), "clause_ids": ((b, length), jnp.int32),
          "clause_fields": ((b, config.scio.max_clauses), jnp.int32)}


def abstract_batch(config: ml_collections.ConfigDict, sharding, batch_size: int | None = None) -> dict:
  """`batch_shapes` as ShapeDtypeStructs with `sharding`: what lowering a step needs."""
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for k, (shape, dtype) in batch_shapes(config, batch_size).items()}


def abstract_rng(mesh) -> jax.ShapeDtypeStruct:
  """A step's random key as a replicated ShapeDtypeStruct on `mesh`."""
  return jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=mesh_lib.replicated(mesh))


def abstract_state(config: ml_collections.ConfigDict, vocab_size: int, mesh):
  """(graph, optimizer, schedule, state shardings, train state as sharded ShapeDtypeStructs):
  a model's state without allocating it, for lowering and compiling its steps."""
  tx, schedule = state_lib.make_optimizer(config.optim, config.train.steps)
  graph, abstract, shardings = state_lib.abstract_state(config, vocab_size, tx, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return graph, tx, schedule, shardings, state


def random_batch(config: ml_collections.ConfigDict, vocab_size: int, seed: int = 0,
                 batch_size: int | None = None) -> dict:
  """Images and captions of `clauses` "$"-separated clauses filling the text length, each
  clause's last two words its keyword: [CLS] w w .. k k $ w w .. k k $ ... [SEP]."""
  rng = np.random.default_rng(seed)
  shapes = batch_shapes(config)
  b = batch_size or shapes["text_ids"][0][0]
  length = shapes["text_ids"][0][1]
  tokens = token_ids(vocab_size)
  clauses = min(config.scio.max_clauses, max((length - 2) // 4, 1))
  clause_len = (length - 2) // clauses  # words + "$"
  ids = rng.integers(SPECIAL, vocab_size, (b, length)).astype(np.int32)
  clause_ids = np.full((b, length), -1, np.int32)
  keyword = np.zeros((b, length), np.int32)
  for k in range(clauses):
    first = 1 + k * clause_len
    last = first + clause_len - 1  # the clause's "$" (or [SEP] after the last clause)
    clause_ids[:, first:last + 1] = k
    keyword[:, last - 2:last] = 1
    ids[:, last] = tokens.separator
  ids[:, 0] = tokens.cls
  ids[:, last] = tokens.sep
  clause_ids[:, last] = -1
  ids[:, last + 1:] = tokens.pad
  fields = np.full((b, config.scio.max_clauses), -1, np.int32)
  fields[:, :clauses] = np.arange(clauses)
  return {"image": rng.standard_normal((b,) + shapes["image"][0][1:]).astype(np.float32), "text_ids": ids,
          "keyword_mask": keyword, "clause_ids": clause_ids, "clause_fields": fields}


def fresh_model(config: ml_collections.ConfigDict, vocab_size: int):
  """(mesh, graph, train state, state shardings, optimizer, schedule) of a new model."""
  mesh = mesh_lib.from_config(config.mesh)
  tx, schedule = state_lib.make_optimizer(config.optim, config.train.steps)
  graph, state, shardings = state_lib.create(config, vocab_size, tx, mesh)
  return mesh, graph, state, shardings, tx, schedule
