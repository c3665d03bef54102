"""Train-step benchmarks: measured throughput, and compiled per-device memory (AOT).

`throughput` runs the jitted step on random inputs of the config's shapes (compute only: the
input pipeline has its own benchmark) and reports steps/s and images/s after compilation.
`compiled_memory` lowers and compiles the step for abstract, sharded inputs without
allocating anything, so the memory of configs/base.py on an 8-device mesh can be read on a
laptop; on TPU topologies (jax[tpu], see launch/) the same function gives per-chip numbers.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from klip_jax.data.tokenizer import TokenIds
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import state as state_lib
from klip_jax.train import step as step_lib


def _tokens(vocab_size: int) -> TokenIds:
  return TokenIds(pad=0, cls=4, enc=5, dec=2, mask=6, sep=3, separator=7, vocab_size=vocab_size)


def _batch_shapes(config: ml_collections.ConfigDict) -> dict:
  b, size, length = config.train.batch_size, config.model.vision.image_size, config.data.max_len
  return {"image": ((b, size, size, 1), jnp.float32), "text_ids": ((b, length), jnp.int32),
          "keyword_mask": ((b, length), jnp.int32), "clause_ids": ((b, length), jnp.int32)}


def random_batch(config: ml_collections.ConfigDict, vocab_size: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  shapes = _batch_shapes(config)
  b, length = shapes["text_ids"][0]
  ids = rng.integers(7, vocab_size, (b, length)).astype(np.int32)
  ids[:, 0] = 4
  return {"image": rng.standard_normal(shapes["image"][0]).astype(np.float32), "text_ids": ids,
          "keyword_mask": (rng.uniform(size=(b, length)) < 0.2).astype(np.int32),
          "clause_ids": rng.integers(0, 8, (b, length)).astype(np.int32)}


def throughput(config: ml_collections.ConfigDict, vocab_size: int, steps: int) -> dict:
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  tx, schedule = state_lib.make_optimizer(config.optim, config.train.steps)
  graph, state, shardings = state_lib.create(config, vocab_size, tx, mesh)
  batch = random_batch(config, vocab_size)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    step = step_lib.make_train_step(config, graph, tx, schedule, _tokens(vocab_size), shardings, mesh)
    start = time.perf_counter()
    state, metrics = step(state, batch, jax.random.key(0))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(steps):
      state, metrics = step(state, batch, jax.random.key(i + 1))
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
  return {"compile_and_first_step_s": compile_s, "steps_per_s": steps / seconds,
          "images_per_s": steps * config.train.batch_size / seconds,
          "batch_size": config.train.batch_size, "devices": mesh.size}


def tpu_devices(topology: str, chips_per_host=(2, 2, 1)):
  """TPU devices of a topology such as "v5e:2x4", for ahead-of-time compilation on a CPU host
  (needs libtpu: pip install -e ".[tpu]"; run with JAX_PLATFORMS=cpu)."""
  from jax.experimental import topologies

  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        chip_config_name="default", chips_per_host_bounds=chips_per_host,
                                        num_slices=1).devices
  except Exception as e:  # libtpu missing or an unknown topology name
    from klip_jax.errors import ConfigError
    raise ConfigError(f"cannot describe TPU topology {topology!r} ({e}); install the [tpu] extra "
                      "and use a name like v5e:2x4.") from None


def compiled_memory(config: ml_collections.ConfigDict, vocab_size: int, mesh_shape,
                    devices=None) -> dict:
  """Per-device bytes of the compiled train step (arguments, outputs, temporaries)."""
  mesh = mesh_lib.make_mesh(mesh_shape, devices)
  tx, schedule = state_lib.make_optimizer(config.optim, config.train.steps)
  graph, abstract, shardings = state_lib.abstract_state(config, vocab_size, tx, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
           for k, (shape, dtype) in _batch_shapes(config).items()}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=mesh_lib.replicated(mesh))
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    step = step_lib.make_train_step(config, graph, tx, schedule, _tokens(vocab_size), shardings, mesh)
    start = time.perf_counter()
    try:
      compiled = step.lower(state, batch, rng).compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      # The compiler's own verdict that the step does not fit is a result, not a crash.
      return {"mesh": dict(zip(mesh_lib.AXES, mesh.devices.shape)), "fits": False,
              "error": str(e).splitlines()[0][:300]}
    compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = 2.0**30
  params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract.params))
  return {"mesh": dict(zip(mesh_lib.AXES, mesh.devices.shape)), "fits": True, "params": params,
          "argument_gib": memory.argument_size_in_bytes / gib,
          "output_gib": memory.output_size_in_bytes / gib,
          "temp_gib": memory.temp_size_in_bytes / gib,
          "alias_gib": memory.alias_size_in_bytes / gib,
          "total_gib": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                        + memory.temp_size_in_bytes - memory.alias_size_in_bytes) / gib,
          "flops_per_device": float(cost.get("flops", float("nan"))) if cost else float("nan"),
          "compile_s": compile_s}
