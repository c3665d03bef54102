"""Evaluation while the model trains: the cheap evaluators of `config.eval.tasks`, every
`config.eval.every` steps and at `config.eval.at_steps`, on the val split (the test split
stays for the final benchmark).

`make_hook` returns the `evaluate(step, graph, params)` callable `train.loop.train` calls; the split,
its features' compiled calls and the runner are made once and reused at every evaluation.
Only numbers are returned (the loop logs them to TensorBoard and metrics.jsonl).
"""

from __future__ import annotations

import logging

import ml_collections
from flax import nnx

from klip_jax.data import builder
from klip_jax.data.prepare import RunData
from klip_jax.data.tokenizer import TokenIds
from klip_jax.eval import registry
from klip_jax.eval.runner import ModelRunner
from klip_jax.parallel import mesh as mesh_lib

log = logging.getLogger(__name__)

SPLIT = "val"


def make_hook(config: ml_collections.ConfigDict, data: RunData, *, progress: bool = False):
  """The in-training evaluation hook, or None when nothing is to run."""
  tasks = registry.cheap_tasks(config.eval.tasks)
  if (config.eval.every <= 0 and not config.eval.at_steps) or not tasks:
    return None
  # Now, not at the first evaluation: the loop evaluates a step before checkpointing it.
  builder.require_split(data.data_dir, SPLIT, f"The in-training evaluation (eval.every={config.eval.every}, "
                        f"eval.at_steps={tuple(config.eval.at_steps)}) reads the {SPLIT} split: give some of the "
                        f"dataset's examples split \"{SPLIT}\" (a manifest line's \"split\"), or train without it: "
                        "--config.eval.every=0 and no eval.at_steps.")
  mesh = mesh_lib.from_config(config.mesh)
  examples = registry.Examples(config, data, SPLIT, config.eval.periodic_examples)
  runners: list[ModelRunner] = []  # made at the first evaluation, its compiled calls reused after

  def evaluate(step: int, graph: nnx.GraphDef, params) -> dict:
    if not runners:
      runners.append(ModelRunner(graph, params, TokenIds.from_codec(data.codec), mesh, config.mesh.rules,
                                 config.eval.batch_size))
    ctx = registry.EvalContext(config, data, runners[0].with_params(params), examples,
                               trained_state=(graph, params), progress=progress)
    results, _ = registry.evaluate(ctx, tasks)
    log.info("step %d eval: %s", step, {t: {k: round(v, 4) for k, v in m.items() if not k.startswith("chance")}
                                        for t, m in results.items()})
    return results

  return evaluate
