"""The evaluators, by name: what each needs and costs, chosen in the config.

Every task is one `Evaluator`: a function of an `EvalContext` returning `{metric: number}` (and
non-numeric details), the things it needs, and its cost. `config.eval.tasks` picks the tasks
of the full benchmark (`klip eval`, the end of `klip pretrain`); the cheap ones among them
also run every `config.eval.every` steps while the model trains (`eval.periodic`), as
big_vision's evaluators do.

Needs:
  trained   the trained model's own outputs (no random-init baseline is run for it)
  decoder   the image-grounded causal decoder
  train     examples of the train split (probes, heads, answer vocabularies, majority levels)
  landcover / boxes / corruption   ground truth the split must record (else: skipped)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable

import ml_collections
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from klip_jax import config as config_lib
from klip_jax.data import knowledge, records, targets
from klip_jax.data.prepare import RunData
from klip_jax.errors import ConfigError
from klip_jax.eval import captioning, detection, heldout, matching, probes, retrieval, screening, vqa, zeroshot
from klip_jax.eval.runner import ModelRunner
from klip_jax.eval.truth import NoTruth, Split, corruption_missing, load_split
from klip_jax.train import scio

log = logging.getLogger(__name__)

NEEDS = ("trained", "decoder", "train", "landcover", "boxes", "corruption")
COSTS = ("cheap", "full")


@dataclasses.dataclass(frozen=True)
class Evaluator:
  name: str
  run: Callable[[EvalContext], dict]
  needs: tuple[str, ...]
  cost: str  # "cheap": runs during training too; "full": only in the benchmark
  benchmark: bool = True  # a downstream task, part of "all" (else run only when named)
  reads: tuple[str, ...] = ()  # config sections or settings beyond eval.* its numbers depend on


class Examples:
  """The evaluated split and a train prefix, each loaded on first use and then shared by every
  parameter set (and every in-training evaluation) that reads them."""

  def __init__(self, config: ml_collections.ConfigDict, data: RunData, split: str, limit: int):
    self.config, self.data, self.split, self.limit = config, data, split, limit

  @functools.cached_property
  def test(self) -> Split:
    """The evaluated split (the test split in the benchmark, val during training)."""
    return load_split(self.data.data_dir, self.split, self.data.codec, self.limit)

  @functools.cached_property
  def train(self) -> Split:
    return load_split(self.data.data_dir, "train", self.data.codec, self.config.eval.train_examples)


class EvalContext:
  """What evaluators read for one parameter set; features are computed on first use, so a
  cheap in-training evaluation computes only what its tasks need."""

  def __init__(self, config: ml_collections.ConfigDict, data: RunData, runner: ModelRunner,
               examples: Examples, *, trained_state=None, caption_finetune=None, progress: bool = True):
    self.config, self.data, self.runner, self.examples = config, data, runner, examples
    self.trained_state = trained_state  # (graph, params) of the trained model, for SCIO tasks
    # (params, finetune.json) of the trained model's saved caption fine-tune, which captioning
    # scores instead of fine-tuning again; None: fine-tune (other parameter sets always do)
    self.caption_finetune = caption_finetune
    self.progress = progress
    self.outputs: dict = {}  # what tasks leave for the suite to write (captions, relabel entries)

  def with_params(self, params, trained_state=None) -> EvalContext:
    """The same examples with another parameter set (compiled calls are shared too)."""
    return EvalContext(self.config, self.data, self.runner.with_params(params), self.examples,
                       trained_state=trained_state, progress=self.progress)

  @property
  def test(self) -> Split:
    return self.examples.test

  @property
  def train(self) -> Split:
    return self.examples.train

  @functools.cached_property
  def test_encoded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image tokens, image ITC features, text ITC features) of the evaluated split."""
    tokens, image_feat = self.runner.encode_images(self.test.images)
    return tokens, image_feat, self.runner.encode_texts(self.test.text_ids)

  @functools.cached_property
  def train_tokens(self) -> np.ndarray:
    return self.runner.encode_images(self.train.images)[0]


REGISTRY: dict[str, Evaluator] = {}


def register(name: str, *, needs: tuple[str, ...] = (), cost: str = "full", benchmark: bool = True,
             reads: tuple[str, ...] = ()):
  assert set(needs) <= set(NEEDS) and cost in COSTS, (name, needs, cost)

  def add(fn: Callable[[EvalContext], dict]) -> Callable[[EvalContext], dict]:
    REGISTRY[name] = Evaluator(name, fn, tuple(needs), cost, benchmark, tuple(reads))
    return fn
  return add


# eval.* settings that say when and how fast a task runs, not what it measures.
_SCHEDULING = ("tasks", "every", "at_steps", "periodic_examples", "batch_size", "random_baseline")


def settings(config: ml_collections.ConfigDict, task: str) -> dict:
  """{"eval.x": value, ...} of the settings `task`'s numbers depend on: eval.*'s (the examples,
  seeds, steps and sizes of every task), less the scheduling ones, and the evaluator's `reads`.
  The benchmark records them with each task's results, so results merged from several
  `klip eval` runs say which numbers were measured how (eval.suite)."""
  every = config_lib.flat(config.to_dict())
  reads = REGISTRY[task].reads
  chosen = {k: v for k, v in every.items()
            if (k.startswith("eval.") and k.removeprefix("eval.") not in _SCHEDULING)
            or any(k == name or k.startswith(f"{name}.") for name in reads)}
  return json.loads(json.dumps(chosen))  # as results.json gives them back (tuples as lists)


@register("retrieval", cost="cheap")
def _retrieval(ctx: EvalContext) -> dict:
  tokens, image_feat, text_feat = ctx.test_encoded
  out, ctx.outputs["i2t_scores"] = retrieval.evaluate(ctx.runner, ctx.test, tokens, image_feat, text_feat,
                                                      ctx.config.eval.rerank_k)
  return out


@register("itm", cost="cheap")
def _itm(ctx: EvalContext) -> dict:
  return matching.evaluate(ctx.runner, ctx.test, *ctx.test_encoded, seed=ctx.config.eval.seed)


@register("heldout_loss", needs=("decoder",), cost="cheap", benchmark=False, reads=("loss", "train.batch_size"))
def _heldout_loss(ctx: EvalContext) -> dict:
  """The training losses (ITC, ITM, keyword reconstruction, weighted total) on the evaluated split:
  what `klip sweep` fits scaling laws to. Not a downstream task, so not in "all": name it."""
  return heldout.evaluate(ctx.config, ctx.runner, ctx.test, ctx.data.codec)


@register("captioning", needs=("decoder", "train"))
def _captioning(ctx: EvalContext) -> dict:
  e = ctx.config.eval
  if ctx.caption_finetune is not None:  # the trained model's saved fine-tune (klip finetune caption)
    params, meta = ctx.caption_finetune
    steps = meta["steps"]
  else:
    params = captioning.finetune(ctx.runner, ctx.train, steps=e.caption_steps, lr=e.caption_lr, seed=e.seed)
    steps = e.caption_steps
  out, ctx.outputs["captions"] = captioning.score(ctx.runner.with_params(params), ctx.data.codec, ctx.test,
                                                  ctx.train, ctx.config)
  out["finetune_steps"] = steps
  out["finetune_saved"] = float(ctx.caption_finetune is not None)
  return out


@register("zeroshot_landcover", needs=("train", "landcover"), cost="cheap")
def _zeroshot_landcover(ctx: EvalContext) -> dict:
  return zeroshot.evaluate(ctx.runner, ctx.data.codec, ctx.test, ctx.test_encoded[1], ctx.train)


@register("target_classification", needs=("train", "boxes"))
def _target_classification(ctx: EvalContext) -> dict:
  return probes.target_classification(ctx.train, ctx.train_tokens, ctx.test, ctx.test_encoded[0],
                                      ctx.config.eval.seed)


@register("segmentation", needs=("train", "landcover"))
def _segmentation(ctx: EvalContext) -> dict:
  return probes.segmentation(ctx.train, ctx.train_tokens, ctx.test, ctx.test_encoded[0], ctx.config.eval.seed,
                             ctx.config.eval.probe_max_patches)


@register("positioning", needs=("train", "boxes"))
def _positioning(ctx: EvalContext) -> dict:
  return probes.positioning(ctx.train, ctx.train_tokens, ctx.test, ctx.test_encoded[0], ctx.config.eval.seed)


def _boxes(split: Split):
  return ([r["truth"]["boxes"] for r in split.records], [r["truth"]["box_classes"] for r in split.records])


@register("detection", needs=("train", "boxes"))
def _detection(ctx: EvalContext) -> dict:
  train_boxes, train_classes = _boxes(ctx.train)
  if not sum(len(b) for b in train_boxes):
    raise NoTruth("no target boxes in the train split")
  test_boxes, test_classes = _boxes(ctx.test)
  return detection.evaluate(
      probes.patch_grid(ctx.train_tokens), train_boxes, train_classes,
      probes.patch_grid(ctx.test_encoded[0]), test_boxes, test_classes,
      image_size=ctx.test.images.shape[1], num_classes=len(targets.TARGET_CLASSES),
      steps=ctx.config.eval.detection_steps, seed=ctx.config.eval.seed)


def _vqa(question: str) -> Callable[[EvalContext], dict]:
  def run(ctx: EvalContext) -> dict:
    e = ctx.config.eval
    planned = vqa.plan(question, ctx.test, ctx.train, max_questions=e.vqa_questions,
                       max_candidates=e.vqa_candidates)  # a skip costs no image encoding
    return vqa.score(planned, ctx.runner, ctx.data.codec, ctx.test_encoded[0])
  return run


for _question in vqa.QUESTIONS:
  register(_question, needs=("decoder", "train"))(_vqa(_question))


def _relabel(ctx: EvalContext, split: str, proofread: bool) -> list[dict]:
  """SCIO's relabel pass over `split` with the trained parameters, every screening signal scored
  (whatever the rule reads); the step is compiled once per runner (once per run for the
  in-training evaluations)."""
  graph, params = ctx.trained_state
  step = ctx.runner.cached(f"relabel_proofread_{proofread}", lambda: scio.restored_relabel_step(
      ctx.config, graph, params, ctx.runner.tokens, ctx.runner.mesh, ctx.data, proofread=proofread,
      every_signal=True))
  return scio.relabel_restored(ctx.config, step, params, ctx.data, split, ctx.runner.mesh, progress=ctx.progress)


@register("screening", needs=("trained", "corruption"), cost="cheap", reads=("scio",))
def _screening(ctx: EvalContext) -> dict:
  """Per-clause screening AUC of SCIO's signals on the val split's noisy captions (captions the
  model never trained on)."""
  _require_corruption(ctx, "val")
  return screening.evaluate(_relabel(ctx, "val", proofread=False))


@register("scio_repair", needs=("trained", "decoder", "corruption"), reads=("scio",))
def _scio_repair(ctx: EvalContext) -> dict:
  _require_corruption(ctx, "train")
  entries = _relabel(ctx, "train", proofread=True)
  out = scio.repair_metrics(entries, ctx.config.scio.max_flags)
  if not out["corrupted_clauses"]:
    raise NoTruth("the train split records no corrupted clauses to repair")
  # An image-blind proofreader: every corrupted clause rewritten to its field's most common value.
  common = {slot: values.most_common(1)[0][0] for slot, values in scio.field_values(ctx.data).items()}
  corrupted = [(e["scene_type"], int(k), true) for e in entries for k, true in e["truth"].items()]
  out["chance_proofreading_accuracy"] = float(np.mean(
      [common.get((scene, knowledge.FIELDS[scene][k])) == true for scene, k, true in corrupted]))
  # Screening AUC on the split the precision and recall above are counted on (the captions the
  # model trained on), beside `screening`'s on val: no model call, the entries hold every signal.
  try:
    screened = screening.evaluate(entries)
  except NoTruth:  # corrupted clauses only in one-clause captions, or every clause corrupted
    screened = {}
  out.update({name: screened[name] for name in ("auc_rule", "auc_rule_visible", "auc_decoder", "auc_itc",
                                                 "auc_itm", "chance_auc", "per_field") if name in screened})
  ctx.outputs["relabel_entries"] = entries
  return out


def _require_corruption(ctx: EvalContext, split: str) -> None:
  """Skip before the relabel pass (the expensive part) when the split records no corrupted clause."""
  if reason := corruption_missing(ctx.data.data_dir, split, ctx.config.eval.train_examples):
    raise NoTruth(reason)


TASKS = tuple(name for name, evaluator in REGISTRY.items() if evaluator.benchmark)  # "all"

# Ground truth a task needs: (what, where a manifest gives it, whether a record has it).
_TRUTH = {
    "landcover": ("land-cover masks", "truth.landcover",
                  lambda r: r["truth"]["dominant"] != records.UNKNOWN_CLASS),
    "boxes": ("target boxes", "truth.boxes with box_classes", lambda r: len(r["truth"]["boxes"]) > 0),
}


def _check_truth(ctx: EvalContext, evaluator: Evaluator) -> None:
  """NoTruth naming the split and the missing truth, before any model call, when a split the
  task reads records none of the land cover or boxes it is scored against."""
  for need in evaluator.needs:
    if need not in _TRUTH:
      continue
    what, key, has = _TRUTH[need]
    for split in [ctx.test] + ([ctx.train] if "train" in evaluator.needs else []):
      if not any(has(r) for r in split.records):
        raise NoTruth(f"no {what} in the {split.name} split: none of its chips records {key} (an ingest "
                      f"manifest gives them per chip)")


def parse_tasks(spec: str) -> list[str]:
  """"all" (TASKS, the benchmark) or a comma-separated list of registered tasks."""
  if spec.strip() in ("", "all"):
    return list(TASKS)
  tasks = [t.strip() for t in spec.split(",") if t.strip()]
  unknown = [t for t in tasks if t not in REGISTRY]
  if unknown:
    raise ConfigError(f"unknown eval task(s) {unknown}; choose from {', '.join(REGISTRY)} or 'all'.")
  return tasks


def cheap_tasks(spec: str) -> list[str]:
  """The cheap tasks among `spec`: the ones that run during training."""
  return [t for t in parse_tasks(spec) if REGISTRY[t].cost == "cheap"]


def evaluate(ctx: EvalContext, tasks: list[str]) -> tuple[dict, dict]:
  """(numeric results per task, non-numeric details per task) for one parameter set."""
  results, details = {}, {}
  for name in tqdm(tasks, desc=f"eval {ctx.examples.split}", unit="task", disable=not ctx.progress, leave=False):
    log.info("eval task %s", name)
    try:
      # One BLAS thread: scikit-learn's solvers beside XLA's busy thread pool otherwise run
      # ~40x slower (measured: a probe fit 10.8 s -> 0.25 s on 2 cores).
      with threadpool_limits(1):
        _check_truth(ctx, REGISTRY[name])
        out = REGISTRY[name].run(ctx)
    except NoTruth as skip:
      log.warning("task %s skipped: %s", name, skip)
      results[name] = {"skipped": 1.0}
      details[name] = {"skipped": str(skip)}
      continue
    details[name] = {k: out.pop(k) for k in [k for k, v in out.items() if not isinstance(v, (int, float))]}
    results[name] = out
  return results, details
