"""`klip ablate scio`: does SCIO help, and do the extensions beyond the paper? Arms trained at
equal total steps from the same seeds on the same world, each evaluated on the same tasks,
summarised as mean and 95% confidence interval per metric, and each arm's difference from the
first arm paired by seed (a seed fixes initialisation and data order in every arm, so much of
the seed-to-seed spread cancels in the difference: an effect can be clear in the paired interval
while the arms' own intervals overlap).

Arms (`ARMS`; the first three by default): `stage_a` (all steps in stage A with the paper's
losses: no relabelling), `paper` (the config's SCIO stages with every extension off: the
paper's method), `extended` (SCIO with the extensions on: part-random ITM negatives, clause
dropout, the decoder-surprise per-field-calibrated screening rule, candidate-ranked
proofreading, up to four flags per caption, no flags in the fields the model cannot read,
rewrites only by a margin over the keyword as written, and only of clauses above a second bar,
the other flagged clauses removed) and
`stage_a_extended` (the extensions' training without relabelling, to separate what SCIO adds
from what the extended losses add). Each extension is also ablated on its own: `extended-no_X`
is `extended` with extension X back at the paper's setting (X one of `EXTENSIONS`), and
`extended+clause_negatives` adds clause-level ITM negatives, a separate switch
(`config.data.clause_negatives`) kept off by default: in a one-seed trial on the demo ITM learned
slower with them. Seed s sets
`config.seed` (initialisation, data order, augmentation); the world and its caption noise
(`config.data.synth`) are shared, built once into WORKDIR/data with one tokenizer.

Layout: WORKDIR/<arm>/seed_<s>/ is an ordinary workdir (`klip eval` works on it), its
results in eval/results.json; a run with results is skipped, an interrupted one resumes from
its checkpoint. WORKDIR/ablation.json, ablation.md and ablation.png hold the summary.
"""

from __future__ import annotations

import json

import matplotlib
import ml_collections
import numpy as np
from scipy import stats

from klip_jax import config as config_lib
from klip_jax import io
from klip_jax.data import prepare
from klip_jax.errors import ConfigError
from klip_jax.eval import registry, suite
from klip_jax.jobs import train as train_job
from klip_jax.train import scio

matplotlib.use("Agg")
from matplotlib import pyplot as plt

# Every switchable extension beyond the paper, off (the paper's method) and on.
PAPER = {"data.clause_negatives": False, "data.clause_dropout": 0.0, "loss.itm_random_negatives": 0.0,
         "scio.rule": "paper", "scio.field_calibration": False, "scio.candidates": False,
         "scio.max_flags": 1, "scio.threshold": 1.0, "scio.skip_fields": "", "scio.keep_margin": 0.0,
         "scio.rewrite_threshold": 0.0}
# Flags come at a lower bar than the paper's (0.5 field-z: precision 0.75, recall 0.63 on the val
# split, seed 0, up to 4 per caption), and only those above 2.5 are rewritten, the others removed
# (configs/demo.py says why). The
# skipped fields are those whose screening AUC sat near chance on the val split (seed 0, 0.51-0.57;
# the others 0.78-0.99): a target scene's city, which no chip shows, and the count, heading and
# location of 32 px targets, which the tiny model does not read.
EXTENDED = {"data.clause_negatives": False, "data.clause_dropout": 0.1, "loss.itm_random_negatives": 0.5,
            "scio.rule": "decoder", "scio.field_calibration": True, "scio.candidates": True,
            "scio.max_flags": 4, "scio.threshold": 0.5,
            "scio.skip_fields": "target.count,target.feature,target.location,target.region", "scio.keep_margin": 2.0,
            "scio.rewrite_threshold": 2.5}
# Each extension by name: the config entries it sets (its paper setting is in PAPER).
EXTENSIONS = {"random_negatives": ("loss.itm_random_negatives",), "clause_dropout": ("data.clause_dropout",),
              # A rewrite bar is in the units of the rule's threshold, which the paper's rule has not.
              "decoder_rule": ("scio.rule", "scio.rewrite_threshold"), "field_calibration": ("scio.field_calibration",),
              "candidates": ("scio.candidates",), "multi_flag": ("scio.max_flags", "scio.threshold"),
              "skip_fields": ("scio.skip_fields",), "keep_margin": ("scio.keep_margin",),
              "rewrite_threshold": ("scio.rewrite_threshold",)}
ARMS = {"stage_a": "stage A only (no relabelling)", "paper": "paper SCIO A -> B -> C",
        "extended": "SCIO + extensions", "stage_a_extended": "stage A only, extensions' training",
        **{f"extended-no_{name}": f"SCIO + extensions, no {name.replace('_', ' ')}" for name in EXTENSIONS},
        "extended+clause_negatives": "SCIO + extensions + clause negatives"}
DEFAULT_ARMS = ("stage_a", "paper", "extended")
TASKS = "retrieval,itm,zeroshot_landcover,vqa_count,vqa_recognition,vqa_position,vqa_landform," \
        "vqa_landforms_present,screening,scio_repair"
# (task, metric) pairs the summary reports, with the level chance reaches where there is one.
METRICS = (("retrieval", "r_mean"), ("retrieval", "itc_r_mean"), ("itm", "auc"), ("itm", "balanced_accuracy"),
           ("zeroshot_landcover", "balanced_accuracy"), ("vqa_count", "accuracy"),
           ("vqa_recognition", "accuracy"), ("vqa_position", "accuracy"), ("vqa_landform", "accuracy"),
           ("vqa_landforms_present", "accuracy"), ("screening", "auc_rule"), ("screening", "auc_rule_visible"),
           ("screening", "auc_itm"), ("screening", "auc_itc"), ("screening", "auc_decoder"),
           ("scio_repair", "screening_precision"),
           ("scio_repair", "screening_recall"), ("scio_repair", "auc_rule"), ("scio_repair", "auc_rule_visible"),
           ("scio_repair", "proofreading_accuracy"),
           ("scio_repair", "clean_clauses_changed_rate"), ("scio_repair", "clean_clauses_removed_rate"),
           ("scio_repair", "wrong_clause_rate_before"), ("scio_repair", "wrong_clause_rate_after"))
CHANCE = {("retrieval", "r_mean"): "chance_r_mean", ("retrieval", "itc_r_mean"): "chance_r_mean",
          ("itm", "auc"): "chance_auc", ("itm", "balanced_accuracy"): "chance_balanced_accuracy",
          ("zeroshot_landcover", "balanced_accuracy"): "chance_balanced_accuracy",
          ("screening", "auc_rule"): "chance_auc", ("screening", "auc_rule_visible"): "chance_auc",
          ("screening", "auc_itm"): "chance_auc", ("screening", "auc_itc"): "chance_auc",
          ("screening", "auc_decoder"): "chance_auc",
          ("scio_repair", "screening_precision"): "chance_screening_precision",
          ("scio_repair", "screening_recall"): "chance_screening_recall",
          ("scio_repair", "auc_rule"): "chance_auc", ("scio_repair", "auc_rule_visible"): "chance_auc",
          ("scio_repair", "proofreading_accuracy"): "chance_proofreading_accuracy"}
for _task in ("vqa_count", "vqa_recognition", "vqa_position", "vqa_landform", "vqa_landforms_present"):
  CHANCE[(_task, "accuracy")] = "chance_accuracy"


def arm_config(config: ml_collections.ConfigDict, arm: str, seed: int, data_dir: str,
               tokenizer: str) -> ml_collections.ConfigDict:
  """The config of one arm and seed: equal total steps, shared data and tokenizer."""
  c = config.copy_and_resolve_references()
  total = scio.total_steps(c.scio)
  if not total:
    raise ConfigError("config.scio has no stages (stage_*_steps all 0); ablate SCIO on a config that "
                      "runs it, e.g. configs/demo.py.")
  c.train.steps = total
  c.seed = seed
  c.data.update(data_dir=data_dir, tokenizer=tokenizer)
  c.eval.update(tasks=TASKS, random_baseline=False, every=0)
  if arm not in ARMS:
    raise ConfigError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}.")
  settings = dict(PAPER if arm in ("stage_a", "paper") else EXTENDED)
  if arm.startswith("extended-no_"):
    settings.update({path: PAPER[path] for path in EXTENSIONS[arm.removeprefix("extended-no_")]})
  if arm == "extended+clause_negatives":
    settings["data.clause_negatives"] = True
  for path, value in settings.items():
    section, name = path.split(".")
    c[section][name] = value
  if arm.startswith("stage_a"):
    c.scio.update(stage_a_steps=total, stage_b_steps=0, stage_c_steps=0)
  return c


def mean_ci(values) -> tuple[float, float, float]:
  """Mean and the 95% Student-t confidence interval of the mean (a point for one value)."""
  x = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
  if len(x) == 0:
    return float("nan"), float("nan"), float("nan")
  m = float(x.mean())
  if len(x) < 2:
    return m, m, m
  half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
  return m, m - half, m + half


def _values(results: list[dict], task: str, metric: str) -> list:
  """One metric of each seed's results.json, None where the task or metric is missing."""
  return [r["tasks"].get(task, {}).get(metric) for r in results]


def summarise(runs: dict[str, list[dict]]) -> dict:
  """{arm: [results.json of each seed]} -> {"task/metric": {arm: {mean, lo, hi, n, chance}, "chance"}}.
  Each arm's chance level is the mean of its seeds' (None where they report none); the row's
  `chance` is the level all arms share, None where they differ: screening recall's chance is as
  many clauses as the arm flagged, picked at random, and an arm that flags up to 4 clauses a
  caption has a higher one than the paper's rule, which flags 1."""
  table = {}
  for task, metric in METRICS:
    row = {}
    chance_key = CHANCE.get((task, metric))
    for arm, results in runs.items():
      values = _values(results, task, metric)
      m, lo, hi = mean_ci(values)
      chances = [c for c in _values(results, task, chance_key) if c is not None] if chance_key else []
      row[arm] = {"mean": m, "lo": lo, "hi": hi, "n": sum(v is not None for v in values),
                  "chance": float(np.mean(chances)) if chances else None}
    levels = [row[arm]["chance"] for arm in runs if row[arm]["chance"] is not None]
    row["chance"] = levels[0] if levels and np.ptp(levels) <= 1e-9 else None
    table[f"{task}/{metric}"] = row
  return table


def paired_differences(runs: dict[str, list[dict]]) -> dict:
  """{arm: [results.json of seeds 0..n-1]} -> {"task/metric": {arm: {mean, lo, hi, n}}}: the
  mean and 95% CI of (arm - first arm) over the seeds both have, for every arm after the first."""
  baseline, *others = runs
  table = {}
  for task, metric in METRICS:
    base = _values(runs[baseline], task, metric)
    row = {}
    for arm in others:
      diffs = [v - b for v, b in zip(_values(runs[arm], task, metric), base) if v is not None and b is not None]
      m, lo, hi = mean_ci(diffs)
      row[arm] = {"mean": m, "lo": lo, "hi": hi, "n": len(diffs)}
    table[f"{task}/{metric}"] = row
  return table


def markdown(table: dict, arms: list[str], seeds: int, paired: dict | None = None) -> str:
  head = "| metric | chance | " + " | ".join(ARMS.get(a, a) for a in arms) + " |"
  lines = [f"# SCIO ablation: {seeds} seed(s), mean [95% CI]", "", head,
           "|" + "---|" * (len(arms) + 2)]
  for name, row in table.items():
    per_arm = row["chance"] is None and any(row[a]["chance"] is not None for a in arms)
    chance = "per arm" if per_arm else "" if row["chance"] is None else f"{row['chance']:.3f}"
    cells = [_cell(row[a], per_arm) for a in arms]
    lines.append(f"| {name} | {chance} | " + " | ".join(cells) + " |")
  if paired and len(arms) > 1:
    lines += ["", f"## Difference from {ARMS.get(arms[0], arms[0])}, paired by seed: mean [95% CI]", "",
              "An interval that excludes 0 (marked *) is an effect beyond seed noise.", "",
              "| metric | " + " | ".join(ARMS.get(a, a) for a in arms[1:]) + " |", "|" + "---|" * len(arms)]
    for name, row in paired.items():
      lines.append(f"| {name} | " + " | ".join(_difference_cell(row[a]) for a in arms[1:]) + " |")
  return "\n".join(lines) + "\n"


def _cell(value: dict, with_chance: bool) -> str:
  """'0.646 [0.627, 0.666]', with '(chance 0.184)' after it where the arms' chance levels differ."""
  if not np.isfinite(value["mean"]):
    return "n/a"
  text = f"{value['mean']:.3f} [{value['lo']:.3f}, {value['hi']:.3f}]"
  return text + (f" (chance {value['chance']:.3f})" if with_chance and value["chance"] is not None else "")


def _difference_cell(d: dict) -> str:
  """'+0.030 [+0.005, +0.055] *': the star when two or more seeds put the interval off 0."""
  if not np.isfinite(d["mean"]):
    return "n/a"
  beyond_noise = d["n"] > 1 and (d["lo"] > 0 or d["hi"] < 0)
  return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" + (" *" if beyond_noise else "")


def plot(table: dict, arms: list[str], path: io.PathLike) -> None:
  names = list(table)
  fig, ax = plt.subplots(figsize=(12, 0.35 * len(names) * len(arms) + 1.5))
  height = 0.8 / len(arms)
  y = np.arange(len(names))
  for i, arm in enumerate(arms):
    means = np.asarray([table[n][arm]["mean"] for n in names])
    lo = np.asarray([table[n][arm]["lo"] for n in names])
    hi = np.asarray([table[n][arm]["hi"] for n in names])
    ax.barh(y + i * height, np.nan_to_num(means), height, xerr=np.nan_to_num([means - lo, hi - means]),
            label=ARMS.get(arm, arm), capsize=2)
  for i, arm in enumerate(arms):  # each arm's chance level on its own bar
    chance = [table[n][arm]["chance"] for n in names]
    ax.scatter([c if c is not None else np.nan for c in chance], y + i * height, marker="|", s=60,
               color="black", label="chance" if i == 0 else None, zorder=3)
  ax.set_yticks(y + 0.4 - height / 2, names)
  ax.invert_yaxis()
  ax.set_xlabel("mean over seeds, 95% CI")
  ax.legend(loc="lower right")
  fig.tight_layout()
  with io.atomic_path(path) as tmp, tmp.open("wb") as f:  # a file object: tmp may be on gs://
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)


def _check_unchanged(config: ml_collections.ConfigDict, run_dir: str) -> None:
  """Refuse to summarise a finished run's results as another config's: a rerun with changed
  settings would otherwise report the old runs under the new settings without a word."""
  saved = config_lib.load_saved(str(io.path(run_dir) / "config.json"))
  before, after = (config_lib.flat(json.loads(c.to_json_best_effort())) for c in (saved, config))
  changed = [f"{name} ({before.get(name)!r} then, {after.get(name)!r} now)"
             for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
  if changed:
    raise ConfigError(f"{run_dir} holds the results of another config: {'; '.join(changed[:8])}"
                      f"{' ...' if len(changed) > 8 else ''}. Use a new --workdir for the new settings, or "
                      f"delete {run_dir} to rerun it with them.")


def _check_evaluated_as_configured(config: ml_collections.ConfigDict, run_dir: str, results: dict) -> None:
  """Refuse results a later `klip eval` of the run measured with other settings than the arm's
  (`klip eval --workdir RUN --config.eval.test_examples=100` merges into the same results.json):
  the table would average numbers measured two ways."""
  for task, recorded in results.get("settings", {}).items():
    wanted = registry.settings(config, task)
    changed = [f"{k} {recorded.get(k)!r} (the arm's: {v!r})" for k, v in wanted.items() if recorded.get(k) != v]
    if changed:
      raise ConfigError(f"{run_dir}/eval/results.json: {task} was evaluated with {'; '.join(changed[:4])}. "
                        f"Evaluate it again with the arm's settings (klip eval --workdir {run_dir} --tasks {task}), "
                        f"or delete {run_dir}/eval to rerun the whole benchmark.")


def ablate(config: ml_collections.ConfigDict, workdir: str, *, seeds: int, arms: list[str] | None = None,
           progress: bool = True) -> dict:
  """Train and evaluate every (arm, seed) not yet done, then write the summary."""
  arms = list(arms or DEFAULT_ARMS)
  for arm in arms:
    arm_config(config, arm, 0, "", "")  # an unknown arm fails before any work
  if seeds < 1:
    raise ConfigError(f"--seeds {seeds}: give at least 1 (3 or more for a confidence interval).")
  data = prepare.ensure(config, workdir)  # every arm reads this data and this tokenizer, none makes its own
  runs: dict[str, list[dict]] = {arm: [] for arm in arms}
  for seed in range(seeds):
    for arm in arms:
      run_dir = str(io.path(workdir) / arm / f"seed_{seed}")
      results_path = io.path(run_dir) / "eval" / "results.json"
      c = arm_config(config, arm, seed, data.data_dir, data.tokenizer)
      if results_path.exists():
        _check_unchanged(c, run_dir)
      else:
        train_job.train(c, run_dir, progress=progress)
        suite.run(c, run_dir, progress=progress)
      runs[arm].append(io.read_json(results_path))
      _check_evaluated_as_configured(c, run_dir, runs[arm][-1])
  table, paired = summarise(runs), paired_differences(runs)
  io.write_json(io.path(workdir) / "ablation.json",
                {"seeds": seeds, "arms": arms, "table": table, "paired_difference": paired})
  io.write_text(io.path(workdir) / "ablation.md", markdown(table, arms, seeds, paired))
  plot(table, arms, io.path(workdir) / "ablation.png")
  return table
