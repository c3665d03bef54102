"""`klip pretrain`, the main job: data + tokenizer, SCIO stages A -> B -> C, then evaluation.

With no data given it synthesises the embedded world (caption noise from the config), trains
the tokenizer, trains through the three stages, and measures what SCIO is for: how well the
model's own heads find and repair the corrupted clauses of the training captions (screening
precision/recall, proofreading accuracy, clean clauses wrongly changed), and image-text
retrieval on the held-out test split. Results go to WORKDIR/eval/ and a summary table is
printed. Running it again on the same workdir resumes where it stopped.
"""

from __future__ import annotations

import json
import os

import ml_collections

from klip_jax.eval import retrieval
from klip_jax.train import loop, scio


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Repair metrics on the train split and retrieval on the test split, written to eval/."""
  run, graph, state = loop.restore(config, workdir)
  entries = scio.relabel_restored(run, graph, state, "train")
  results = {"step": int(state.step), "repair": scio.repair_metrics(entries),
             "retrieval": retrieval.evaluate(graph, state.params, run.data_dir, "test", run.codec,
                                             run.mesh, config.mesh.rules)}
  folder = os.path.join(workdir, "eval")
  os.makedirs(folder, exist_ok=True)
  loop.write_atomic(os.path.join(folder, "pretrain_summary.json"), json.dumps(results, indent=2))
  loop.write_atomic(os.path.join(folder, "relabel_train.jsonl"), "".join(json.dumps(e) + "\n" for e in entries))
  return results


def summary_table(results: dict) -> str:
  repair, ret = results["repair"], results["retrieval"]
  rows = [("step", results["step"]),
          ("screening precision", f"{repair['screening_precision']:.3f}"),
          ("screening recall", f"{repair['screening_recall']:.3f}"),
          ("proofreading accuracy", f"{repair['proofreading_accuracy']:.3f}"),
          ("clean clauses changed", f"{repair['clean_clauses_changed']} ({repair['clean_clauses_changed_rate']:.3%})"),
          ("flagged / corrupted clauses", f"{repair['flagged']} / {repair['corrupted_clauses']}"),
          ("retrieval r_mean (test)", f"{ret['r_mean']:.3f} (chance {ret['chance_r_mean']:.3f})"),
          ("i2t R@1/5/10", f"{ret['i2t_r1']:.3f} / {ret['i2t_r5']:.3f} / {ret['i2t_r10']:.3f}"),
          ("t2i R@1/5/10", f"{ret['t2i_r1']:.3f} / {ret['t2i_r5']:.3f} / {ret['t2i_r10']:.3f}")]
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def pretrain(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None,
             progress: bool = True) -> dict | None:
  """Run (or resume) the whole job; returns the evaluation results, None if stopped early."""
  total = scio.total_steps(config.scio)
  if total:
    config.train.steps = total
  loop.train(config, workdir, stop_at=stop_at, progress=progress)
  if stop_at is not None and stop_at < config.train.steps:
    return None
  return evaluate(config, workdir)
