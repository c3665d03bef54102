"""`klip eval`: the full downstream benchmark of a trained workdir, next to a randomly
initialised model of the same config and the chance / majority level of every task.

Runs the evaluators `config.eval.tasks` picks (`eval.registry`) on the test split, with a
prefix of the train split for probes, heads and answer vocabularies, and writes WORKDIR/eval/:
  results.json       {"step", "tasks": {task: {metric: number}}, "random_init": {...}}
  details.json       confusion matrices and VQA question texts
  captions_test.jsonl  generated captions (greedy, beam) beside the reference
  relabel_train.jsonl  SCIO's screening/proofreading of every train caption (scio_repair)
  report.md and PNG plots (report.py)
A task whose ground truth the data lacks (e.g. real chips without land-cover masks) is
reported as skipped, with the reason (also in results.json, as "skipped": {task: reason}).
The checkpoint's data must exist: nothing is built.
"""

from __future__ import annotations

import logging

import ml_collections

from klip_jax import io
from klip_jax.data import prepare
from klip_jax.data.tokenizer import TokenIds
from klip_jax.eval import registry, report
from klip_jax.eval.runner import ModelRunner
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import checkpoint
from klip_jax.train import state as state_lib

log = logging.getLogger(__name__)


def _saved_caption_finetune(config: ml_collections.ConfigDict, workdir: str, data, mesh, step: int,
                            wanted: bool):
  """(params, finetune.json) of the workdir's caption fine-tune when it was made from checkpoint
  `step`; None otherwise (captioning then fine-tunes as part of the benchmark)."""
  meta = checkpoint.caption_finetune_meta(workdir) if wanted else None
  if meta is None:
    return None
  if meta["source_step"] != step:
    log.warning("%s/caption_finetune was made from step %d, not the evaluated step %d: fine-tuning again",
                workdir, meta["source_step"], step)
    return None
  log.info("captioning scores the saved caption fine-tune of step %d (%d steps)", step, meta["steps"])
  return checkpoint.restore_caption_finetune(config, workdir, data.codec.vocab_size, mesh), meta


def run(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
        progress: bool = True) -> dict:
  """Evaluate a workdir's checkpoint (default: the latest) and write WORKDIR/eval/."""
  tasks = registry.parse_tasks(config.eval.tasks)
  c = config
  data = prepare.locate(c, workdir)
  mesh = mesh_lib.from_config(c.mesh)
  graph, state = checkpoint.restore(c, workdir, data.codec.vocab_size, mesh, step)
  runner = ModelRunner(graph, state.params, TokenIds.from_codec(data.codec), mesh, c.mesh.rules,
                       c.eval.batch_size)
  examples = registry.Examples(c, data, "test", c.eval.test_examples)
  model = registry.EvalContext(c, data, runner, examples, trained_state=(graph, state.params),
                               caption_finetune=_saved_caption_finetune(c, workdir, data, mesh, int(state.step),
                                                                        "captioning" in tasks),
                               progress=progress)
  results, details = registry.evaluate(model, tasks)
  out = {"step": int(state.step), "tasks": results}
  skipped = {task: d["skipped"] for task, d in details.items() if "skipped" in d}
  if skipped:  # the reasons travel with the results (the stdout table and results.json show them)
    out["skipped"] = skipped
  if c.eval.random_baseline:
    tx, _ = state_lib.make_optimizer(c.optim, c.train.steps)
    _, fresh, _ = state_lib.create(c, data.codec.vocab_size, tx, mesh)
    out["random_init"], _ = registry.evaluate(
        model.with_params(fresh.params), [t for t in tasks if "trained" not in registry.REGISTRY[t].needs])
  folder = io.path(workdir) / "eval"
  io.write_json(folder / "results.json", out)
  io.write_json(folder / "details.json", details)
  if "captions" in model.outputs:
    io.write_jsonl(folder / "captions_test.jsonl", model.outputs["captions"])
  if "relabel_entries" in model.outputs:
    io.write_jsonl(folder / "relabel_train.jsonl", model.outputs["relabel_entries"])
  test = model.test if "i2t_scores" in model.outputs else None
  report.write(folder, out, details, test, model.outputs.get("i2t_scores"),
               io.path(workdir) / "metrics.jsonl", c.scio, model.outputs.get("relabel_entries"))
  return out
