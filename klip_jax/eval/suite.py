"""`klip eval`: the full downstream benchmark of a trained workdir, next to a randomly
initialised model of the same config and the chance / majority level of every task.

Runs the evaluators `config.eval.tasks` picks (`eval.registry`) on the test split, with a
prefix of the train split for probes, heads and answer vocabularies, and writes WORKDIR/eval/:
  results.json       {"step", "tasks": {task: {metric: number}}, "random_init": {...},
                      "settings": {task: {"eval.x": value, ...}}: what each task's numbers depend on}
  details.json       confusion matrices and VQA question texts
  captions_test.jsonl  generated captions (greedy, beam) beside the reference
  relabel_train.jsonl  SCIO's screening/proofreading of every train caption (scio_repair)
  report.md and PNG plots (report.py)
A task whose ground truth the data lacks (e.g. real chips without land-cover masks) is
reported as skipped, with the reason (also in results.json, as "skipped": {task: reason}).
The checkpoint's data must exist: nothing is built.

Where results go, and why. WORKDIR/eval/ is the benchmark of one checkpoint step, the one every
reader takes as the run's: `klip pretrain` returns it, `klip ablate` reads each run's
eval/results.json, `klip export` writes it into the model card. A full benchmark takes minutes to
hours, so no later run may throw it away:
  - a run of the step eval/ holds (or of any step while eval/ holds none) is merged into it task by
    task: a task run again replaces that task's entry (its scores, its skip reason, its details and
    files, its random-init row when that was recomputed), every other task's entry stays, and
    report.md and the plots are written again from the merged results. `klip eval --tasks itm`
    after a full benchmark refreshes itm and leaves the rest. Each task keeps the settings it was
    measured with (`registry.settings`), and report.md names any that differ between tasks;
  - a run of the latest checkpoint when eval/ holds an older step first moves eval/'s files into
    eval/step_<old>/ (results.json last, so an interrupted move finishes on the next run), then
    writes eval/ afresh: eval/ follows the latest checkpoint, as the readers above expect;
  - a run of any other step (`--step` of an older checkpoint) goes to eval/step_<S>/, merged there
    the same way, so it never overwrites the run's benchmark.
Merging, not a folder per task subset, keeps eval/results.json the one complete answer for the
step those readers look up (a subset in a folder of its own would leave eval/ stale or force
every reader to search folders). `results_folder` says where a step's results are.
"""

from __future__ import annotations

import logging

import ml_collections
from etils import epath

from klip_jax import config as config_lib
from klip_jax import io
from klip_jax.data import prepare
from klip_jax.data.tokenizer import TokenIds
from klip_jax.eval import registry, report
from klip_jax.eval.runner import ModelRunner
from klip_jax.parallel import hosts
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
  """Evaluate a workdir's checkpoint (default: the latest), merge the results into WORKDIR/eval/
  (or eval/step_<S>/ for an older step: the module docstring) and return what results.json now
  holds: this run's tasks and those of earlier runs of the same step."""
  tasks = registry.parse_tasks(config.eval.tasks)
  c = config
  data = prepare.locate(c, workdir)
  io.check_writable(io.path(workdir) / "eval" / "results.json")  # a read-only copy of someone's run: fail now
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
  out = {"step": int(state.step), "tasks": results, "settings": {t: registry.settings(c, t) for t in tasks}}
  skipped = {task: d["skipped"] for task, d in details.items() if "skipped" in d}
  if skipped:  # the reasons travel with the results (the stdout table and results.json show them)
    out["skipped"] = skipped
  if c.eval.random_baseline:
    tx, _ = state_lib.make_optimizer(c.optim, c.train.steps)
    _, fresh, _ = state_lib.create(c, data.codec.vocab_size, tx, mesh)
    out["random_init"], _ = registry.evaluate(
        model.with_params(fresh.params), [t for t in tasks if "trained" not in registry.REGISTRY[t].needs])
  outputs = dict(model.outputs)
  if "i2t_scores" in outputs:
    outputs["test"] = model.test
  return save(_folder(c, workdir, out["step"], latest=step is None), out, details, tasks, outputs,
              io.path(workdir) / "metrics.jsonl", c.scio)


# Files a task leaves beside results.json: (file, the task that writes it, its EvalContext.outputs key).
_TASK_FILES = (("captions_test.jsonl", "captioning", "captions"),
               ("relabel_train.jsonl", "scio_repair", "relabel_entries"))


def _read_results(folder: epath.Path) -> dict | None:
  """A folder's results.json; None where there is none. One that cannot be read (a truncated
  write of an older version, a hand edit) is renamed aside with a warning rather than merged
  into or overwritten, so whatever it still holds stays on disk."""
  path = folder / "results.json"
  if not path.exists():
    return None
  try:
    saved = io.read_json(path)
    if isinstance(saved, dict) and isinstance(saved.get("step"), int) and isinstance(saved.get("tasks"), dict):
      return saved
  except ValueError:
    pass
  aside, k = folder / "results.unreadable.json", 0
  while aside.exists():  # an earlier unreadable file stays too
    k += 1
    aside = folder / f"results.unreadable-{k}.json"
  log.warning("%s is not a benchmark's results.json; moved to %s, a fresh one is written", path, aside)
  if hosts.is_writer():
    io.replace(path, aside)
  return None


def results_folder(workdir: str, step: int) -> epath.Path:
  """Where the benchmark of checkpoint `step` is (or would go): WORKDIR/eval/ when it holds
  that step or nothing yet, else WORKDIR/eval/step_<step>/."""
  top = io.path(workdir) / "eval"
  if not (top / "results.json").exists():
    return top
  try:
    held = io.read_json(top / "results.json").get("step")
  except (ValueError, AttributeError):
    held = None
  return top if held == step else top / f"step_{step}"


def _folder(config: ml_collections.ConfigDict, workdir: str, step: int, latest: bool) -> epath.Path:
  """The folder this run of checkpoint `step` writes to (the module docstring's rules); moves
  an older step's benchmark out of eval/ when `step` is the latest checkpoint."""
  top = io.path(workdir) / "eval"
  held = _read_results(top)
  if held is None or held["step"] == step:
    return top
  if not latest and step != checkpoint.latest_step(config, workdir):
    log.info("step %d is not the latest checkpoint: results go to %s (eval/ keeps step %d)",
             step, top / f"step_{step}", held["step"])
    return top / f"step_{step}"
  _archive(top, held["step"])
  return top


def _archive(top: epath.Path, step: int) -> None:
  """Move the files of eval/ (the benchmark of an older `step`) into eval/step_<step>/ (or
  step_<step>_<k>/ where that already holds results), results.json last: a move cut short
  leaves eval/ still naming its step, and the next run moves the rest into the same folder."""
  target, k = top / f"step_{step}", 0
  while (target / "results.json").exists():
    k += 1
    target = top / f"step_{step}_{k}"
  log.warning("eval/ holds the benchmark of step %d: moving it to %s before writing the latest step's", step, target)
  if not hosts.is_writer():
    return
  files = sorted((p for p in top.iterdir() if p.is_file() and not p.name.startswith(".")),
                 key=lambda p: p.name == "results.json")
  target.mkdir(parents=True, exist_ok=True)
  for p in files:
    io.replace(p, target / p.name)


def _by_task_order(entries: dict) -> dict:
  """`entries` in the registry's task order (so merged runs read like one), unknown names last."""
  rank = {t: i for i, t in enumerate(registry.TASKS)}
  return dict(sorted(entries.items(), key=lambda item: rank.get(item[0], len(rank))))


def merge(previous: dict | None, out: dict, ran: list[str]) -> dict:
  """results.json of one step: this run's `out` over the `previous` one, task by task. A task in
  `ran` replaces its earlier entry whole (scores, skip reason, the settings it was measured
  with); the random-init row of a task is replaced only where this run recomputed it (it does
  not depend on the checkpoint, and a run with eval.random_baseline off should not erase the one
  measured before), and dropped where the task ran again with other settings and the row was
  not recomputed (it would sit beside numbers measured another way)."""
  if previous is None:
    return out
  keep = lambda section: {t: v for t, v in previous.get(section, {}).items() if t not in ran}
  merged = {"step": out["step"], "tasks": _by_task_order({**keep("tasks"), **out["tasks"]}),
            "settings": _by_task_order({**keep("settings"), **out["settings"]})}
  skipped = {**keep("skipped"), **out.get("skipped", {})}
  if skipped:
    merged["skipped"] = _by_task_order(skipped)
  before = previous.get("settings", {})
  stale = {t for t in ran if before.get(t) != out["settings"][t]}
  random_init = {**{t: v for t, v in previous.get("random_init", {}).items() if t not in stale},
                 **out.get("random_init", {})}
  if random_init:
    merged["random_init"] = _by_task_order(random_init)
  return merged


def _read_details(folder: epath.Path) -> dict:
  """A folder's details.json ({} where there is none, or none readable: the scores in results.json
  matter more than the confusion matrices and question texts a broken file held)."""
  path = folder / "details.json"
  try:
    details = io.read_json(path) if path.exists() else {}
  except ValueError:
    details = None
  if not isinstance(details, dict):
    log.warning("%s cannot be read; the earlier tasks' details are not carried over", path)
    return {}
  return details


def save(folder: epath.Path, out: dict, details: dict, ran: list[str], outputs: dict, metrics_path: epath.Path,
         scio_config) -> dict:
  """Merge a run's results into `folder` (`merge`; details.json and the per-task files the same
  way), write report.md and the plots from the merged results, and return them."""
  previous = _read_results(folder)
  if previous is not None:
    replaced = [t for t in ran if t in previous["tasks"]]
    log.info("%s: merging step %d; replaced %s, kept %s", folder / "results.json", out["step"],
             ", ".join(replaced) or "nothing", ", ".join(t for t in previous["tasks"] if t not in ran) or "nothing")
    details = {**{t: d for t, d in _read_details(folder).items() if t not in ran}, **details}
  merged = merge(previous, out, ran)
  for line in config_lib.differences(merged["settings"]):
    log.warning("%s: tasks measured with different settings: %s", folder / "results.json", line)
  details = _by_task_order(details)
  io.write_json(folder / "results.json", merged)
  io.write_json(folder / "details.json", details)
  kept = {}
  for name, task, key in _TASK_FILES:
    path = folder / name
    if key in outputs:
      io.write_jsonl(path, outputs[key])
    elif task in ran and path.exists() and hosts.is_writer():
      path.unlink()  # the task ran again and left none: the old file would describe a replaced entry
    elif task in merged["tasks"] and path.exists():
      kept[key] = io.read_jsonl(path)
  report.write(folder, merged, details, outputs.get("test"), outputs.get("i2t_scores"), metrics_path, scio_config,
               outputs.get("relabel_entries", kept.get("relabel_entries")))
  return merged
