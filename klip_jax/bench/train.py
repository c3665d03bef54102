"""Train-step throughput: the jitted step on random inputs of the config's shapes (compute
only: the input pipeline has its own benchmark), steps/s and images/s after compilation.
(Compiled memory, on CPU devices or TPU topologies, is `aot.compiled_memory`.)
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from klip_jax import compilations
from klip_jax.bench import aot, hf_blip, inputs, timing
from klip_jax.bench import flops as flops_lib
from klip_jax.bench import peak as peak_lib
from klip_jax.bench import profile as profile_lib
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import step as step_lib


def _jax_vision_forward_backward(graph, params) -> Callable:
  """The kernel baseline: the vision tower's forward + backward alone, -> fn(images)."""
  vision_graph, vision_params = nnx.split(nnx.merge(graph, params).vision)
  vision_params = jax.tree.map(jnp.copy, vision_params)  # the train step donates `params`

  @jax.jit
  def grads(p, images):
    return jax.grad(lambda q: jnp.mean(jnp.square(nnx.merge(vision_graph, q)(images))))(p)

  return lambda images: jax.block_until_ready(grads(vision_params, images))


def throughput(config: ml_collections.ConfigDict, vocab_size: int, *, steps: int = 3, rounds: int = 7,
               compare_hf: bool = False, peak_tflops: float | None = None, profile_dir: str = "") -> dict:
  """The full train step on random inputs of the config's shapes (compute only: the input
  pipeline has its own benchmark): median step time over `rounds` rounds of `steps` steps,
  model FLOPs per step (`flops.train_step`) and the MFU they imply, and the compilations seen
  after the first step (0 in a steady state).

  With `profile_dir`, `steps` more steps are traced there and the ops that took the most time
  are listed. With `compare_hf`, transformers' BLIP pretraining step of the same sizes (`hf_blip`) is
  timed in the same rounds, and the vision tower's forward + backward alone in both, the
  kernel baseline: the whole-step ratio reads as that ratio times our own overhead.
  """
  if compare_hf and config.momentum.enabled:
    config = config.copy_and_resolve_references()  # BLIP's step without its momentum encoder:
    config.momentum.enabled = False                # like for like (`hf_blip` has none)
  mesh, graph, state, shardings, tx, schedule = inputs.fresh_model(config, vocab_size)
  batch = inputs.random_batch(config, vocab_size)
  b = config.train.batch_size
  tokens = inputs.token_ids(vocab_size)
  flops = flops_lib.train_step(config, vocab_size)
  holder = {"state": state, "i": 0}
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    step = step_lib.make_train_step(config, graph, tx, schedule, tokens, shardings, mesh)

    def run(n):
      for _ in range(n):
        holder["i"] += 1
        holder["state"], metrics = step(holder["state"], batch, jax.random.key(holder["i"]))
      jax.block_until_ready(metrics)

    # The first step alone: a second step that compiles again (its input state differs from
    # the first's) is a steady-state recompilation, and counted as one below.
    start = time.perf_counter()
    with compilations.Counter() as first:
      run(1)
    first_s = time.perf_counter() - start
    ours = functools.partial(run, steps)
    contenders = {"klip_jax": ours}
    if compare_hf:
      module = hf_blip.build(config.model, vocab_size, tokens)
      hf_blip.load_params(module, jax.device_get(holder["state"].params.to_pure_dict()), config.model)
      hf_step = hf_blip.make_step(module, config, tokens)
      contenders["hf"] = lambda: [hf_step(batch) for _ in range(steps)]
      vision_images = batch["image"]
      contenders["klip_jax_vision"] = functools.partial(
          _jax_vision_forward_backward(graph, holder["state"].params), vision_images)
      contenders["hf_vision"] = functools.partial(hf_blip.vision_forward_backward(module), vision_images)
    with compilations.Counter() as steady:
      seconds = timing.interleaved(contenders, rounds=rounds)
    traced = profile_lib.trace(ours, profile_dir) if profile_dir else None
  step_s = seconds["klip_jax"] / steps
  peak, peak_source = peak_lib.peak_tflops(peak_tflops)
  result = {"config": {"batch_size": b, "image_size": config.model.vision.image_size,
                       "text_len": config.data.max_len, "devices": mesh.size,
                       "params": sum(int(x.size) for x in jax.tree.leaves(holder["state"].params))},
            "momentum": bool(config.momentum.enabled),
            "klip_jax": {"step_s": step_s, "images_per_s": b / step_s, "first_step_s": first_s,
                         "compilations_first_step": first.count,
                         "compilations_steady_state": steady.by_name[step_lib.JIT_NAME],
                         "flops_per_step": flops,
                         "mfu": peak_lib.mfu(flops, step_s, mesh.size, peak)},
            "peak_tflops": peak, "peak_source": peak_source, "rounds": rounds, "steps_per_round": steps}
  if traced:
    result["profile"] = {"trace": traced, "top_ops": profile_lib.top_ops(traced, calls=steps)}
  if compare_hf:
    hf_s = seconds["hf"] / steps
    result["hf"] = {"step_s": hf_s, "images_per_s": b / hf_s, "params": hf_blip.parameter_count(module)}
    result["ratio"] = hf_s / step_s
    result["kernel_baseline"] = {"klip_jax_vision_fwd_bwd_s": seconds["klip_jax_vision"],
                                 "hf_vision_fwd_bwd_s": seconds["hf_vision"],
                                 "ratio": seconds["hf_vision"] / seconds["klip_jax_vision"]}
  return result


# `klip bench memory --topology` (cli) reads the devices of a TPU slice here; they live in aot.
tpu_devices = aot.tpu_devices
