"""`klip eval`: the downstream benchmark of a trained workdir, next to a randomly initialised
model of the same config and the chance / majority level of every task.

Reads the workdir's test split (all tasks) and a prefix of its train split (probes, the
detection head, answer vocabularies, caption baselines), encodes both once per parameter set,
runs the chosen tasks, and writes WORKDIR/eval/:
  results.json       {"step", "tasks": {task: {metric: number}}, "random_init": {...}}
  details.json       confusion matrices and VQA question texts
  captions_test.jsonl  generated captions (greedy, beam) beside the reference
  relabel_train.jsonl  SCIO's screening/proofreading of every train caption (scio_repair)
  report.md and PNG plots (report.py)
A task whose ground truth the data lacks (e.g. real chips without land-cover masks) is
reported as skipped, with the reason.
"""

from __future__ import annotations

import json
import logging
import os

import ml_collections
from threadpoolctl import threadpool_limits

from klip_jax.data import knowledge, world
from klip_jax.errors import ConfigError
from klip_jax.eval import captioning, detection, probes, report, retrieval, vqa, zeroshot
from klip_jax.eval.examples import NoTruth, Split, load_split
from klip_jax.eval.runner import ModelRunner
from klip_jax.train import loop, scio
from klip_jax.train import state as state_lib
from klip_jax.train.step import TokenIds

log = logging.getLogger(__name__)

TASKS = ("retrieval", "captioning", "zeroshot_landcover", "target_classification", "segmentation",
         "positioning", "detection", *vqa.QUESTIONS, "scio_repair")
# Tasks of the trained model only (the random-init baseline would relabel nothing useful).
_MODEL_ONLY = ("scio_repair",)


def parse_tasks(spec: str) -> list[str]:
  """"all" or a comma-separated subset of TASKS."""
  if spec.strip() in ("", "all"):
    return list(TASKS)
  tasks = [t.strip() for t in spec.split(",") if t.strip()]
  unknown = [t for t in tasks if t not in TASKS]
  if unknown:
    raise ConfigError(f"unknown eval task(s) {unknown}; choose from {', '.join(TASKS)} or 'all'.")
  return tasks


class _Encoded:
  """One parameter set's image tokens and ITC features of the test and train examples."""

  def __init__(self, runner: ModelRunner, test: Split, train: Split):
    self.test_tokens, self.test_image_feat = runner.encode_images(test.images)
    self.test_text_feat = runner.encode_texts(test.text_ids)
    self.train_tokens, _ = runner.encode_images(train.images)


def _boxes(split: Split):
  return ([r["truth"]["boxes"] for r in split.records], [r["truth"]["box_classes"] for r in split.records])


def _scio_repair(run, graph, state) -> tuple[dict, list[dict]]:
  entries = scio.relabel_restored(run, graph, state, "train")
  out = scio.repair_metrics(entries)
  if not out["corrupted_clauses"]:
    raise NoTruth("the train split records no corrupted clauses to repair")
  clauses = sum(len(e["caption"].split(knowledge.SEPARATOR)) for e in entries)
  out["chance_screening_precision"] = out["corrupted_clauses"] / clauses  # flagging at random
  return out, entries


def _run_task(name: str, ev: dict) -> dict:
  """One task on one parameter set; `ev` holds what the tasks read."""
  runner, codec, test, train, enc, c = (ev[k] for k in ("runner", "codec", "test", "train", "enc", "config"))
  e = c.eval
  if name == "retrieval":
    out, ev["i2t_scores"] = retrieval.evaluate(runner, test, enc.test_tokens, enc.test_image_feat,
                                               enc.test_text_feat, e.rerank_k)
    return out
  if name == "captioning":
    tuned = runner.with_params(captioning.finetune(runner, train, steps=e.caption_steps,
                                                   lr=e.caption_lr, seed=e.seed))
    shown = _head(test, e.caption_examples or len(test))
    out, ev["captions"] = captioning.evaluate(
        tuned, codec, shown, tuned.encode_images(shown.images)[0], train.captions,
        max_len=codec.max_len, beam_size=e.beam_size, seed=e.seed)
    out["finetune_steps"] = e.caption_steps
    return out
  if name == "zeroshot_landcover":
    return zeroshot.evaluate(runner, codec, test, enc.test_image_feat, train)
  if name == "target_classification":
    return probes.target_classification(train, enc.train_tokens, test, enc.test_tokens, e.seed)
  if name == "segmentation":
    return probes.segmentation(train, enc.train_tokens, test, enc.test_tokens, e.seed, e.probe_max_patches)
  if name == "positioning":
    return probes.positioning(train, enc.train_tokens, test, enc.test_tokens, e.seed)
  if name == "detection":
    train_boxes, train_classes = _boxes(train)
    if not sum(len(b) for b in train_boxes):
      raise NoTruth("no target boxes in the train split")
    test_boxes, test_classes = _boxes(test)
    return detection.evaluate(
        probes.patch_grid(enc.train_tokens), train_boxes, train_classes,
        probes.patch_grid(enc.test_tokens), test_boxes, test_classes,
        image_size=test.images.shape[1], num_classes=len(world.TARGET_CLASSES),
        steps=e.detection_steps, seed=e.seed)
  if name in vqa.QUESTIONS:
    return vqa.evaluate(name, runner, codec, test, enc.test_tokens, train,
                        max_questions=e.vqa_questions, max_candidates=e.vqa_candidates)
  out, ev["relabel_entries"] = _scio_repair(ev["run"], ev["graph"], ev["state"])
  return out


def _head(split: Split, n: int) -> Split:
  return Split(split.name, split.records[:n], split.images[:n], split.keywords[:n],
               split.captions[:n], split.text_ids[:n])


def _evaluate(ev: dict, tasks: list[str]) -> tuple[dict, dict]:
  """(numeric results per task, non-numeric details per task) for one parameter set."""
  ev["enc"] = _Encoded(ev["runner"], ev["test"], ev["train"])
  results, details = {}, {}
  for name in tasks:
    log.info("eval task %s", name)
    try:
      # One BLAS thread: scikit-learn's solvers beside XLA's busy thread pool otherwise run
      # ~40x slower (measured: a probe fit 10.8 s -> 0.25 s on 2 cores).
      with threadpool_limits(1):
        out = _run_task(name, ev)
    except NoTruth as skip:
      log.warning("task %s skipped: %s", name, skip)
      results[name] = {"skipped": 1.0}
      details[name] = {"skipped": str(skip)}
      continue
    details[name] = {k: out.pop(k) for k in [k for k, v in out.items() if not isinstance(v, (int, float))]}
    results[name] = out
  return results, details


def run(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
        tasks: list[str] | None = None) -> dict:
  """Evaluate a workdir's checkpoint (default: the latest) and write WORKDIR/eval/."""
  tasks = parse_tasks(config.eval.tasks) if tasks is None else tasks
  run_, graph, state = loop.restore(config, workdir, step)
  c, codec = run_.config, run_.codec
  test = load_split(run_.data_dir, "test", codec, c.eval.test_examples)
  train = load_split(run_.data_dir, "train", codec, c.eval.train_examples)
  tokens = TokenIds.from_codec(codec)

  runner = ModelRunner(graph, state.params, tokens, run_.mesh, c.mesh.rules, c.eval.batch_size)

  def context(runner):
    return {"runner": runner, "codec": codec, "test": test, "train": train, "config": c,
            "run": run_, "graph": graph, "state": state}

  model = context(runner)
  results, details = _evaluate(model, tasks)
  out = {"step": int(state.step), "tasks": results}
  if c.eval.random_baseline:
    tx, _ = state_lib.make_optimizer(c.optim, c.train.steps)
    _, fresh, _ = state_lib.create(c, codec.vocab_size, tx, run_.mesh)
    out["random_init"], _ = _evaluate(context(runner.with_params(fresh.params)),
                                      [t for t in tasks if t not in _MODEL_ONLY])
  folder = os.path.join(workdir, "eval")
  os.makedirs(folder, exist_ok=True)
  loop.write_atomic(os.path.join(folder, "results.json"), json.dumps(out, indent=2))
  loop.write_atomic(os.path.join(folder, "details.json"), json.dumps(details, indent=2))
  if "captions" in model:
    loop.write_atomic(os.path.join(folder, "captions_test.jsonl"),
                      "".join(json.dumps(row) + "\n" for row in model["captions"]))
  if "relabel_entries" in model:
    loop.write_atomic(os.path.join(folder, "relabel_train.jsonl"),
                      "".join(json.dumps(e) + "\n" for e in model["relabel_entries"]))
  report.write(folder, out, details, test, model.get("i2t_scores"),
               os.path.join(workdir, "metrics.jsonl"), c.scio)
  return out

