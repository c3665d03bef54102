"""The benchmark's report: one markdown table (this model / random init / chance) and plots.

Plots: retrieval.png (test chips with their top re-ranked captions), confusion.png (zero-shot
land cover, target probe, segmentation; rows normalised), training_curves.png (losses and
accuracies from metrics.jsonl, SCIO stages shaded, and the in-training evaluations).
"""

from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from klip_jax import config as config_lib
from klip_jax import io
from klip_jax.data import builder, knowledge, pipeline, targets, terrain
from klip_jax.parallel import hosts
from klip_jax.train import scio

HEADLINES = {
    "retrieval": ("r_mean", "i2t_r1", "t2i_r1", "itc_r_mean"),
    "captioning": ("greedy_bleu4", "greedy_cider", "beam_bleu4", "beam_cider"),
    "zeroshot_landcover": ("accuracy", "balanced_accuracy"),
    "target_classification": ("accuracy", "balanced_accuracy"),
    "segmentation": ("miou", "pixel_accuracy"),
    "positioning": ("exact_match", "f1"),
    "detection": ("map50",),
    "itm": ("auc", "balanced_accuracy", "accuracy"),
    "screening": ("auc_rule", "auc_itc", "auc_itm", "auc_decoder"),
    "scio_repair": ("screening_precision", "screening_recall", "auc_rule", "proofreading_accuracy",
                    "clean_clauses_changed_rate", "clean_clauses_removed_rate", "wrong_clause_rate_before",
                    "wrong_clause_rate_after"),
    "heldout_loss": ("total", "itc", "itm", "reconstruction"),
}
_CONFUSIONS = {"zeroshot_landcover": terrain.LANDCOVER,
               "target_classification": tuple(c.name for c in targets.TARGET_CLASSES),
               "segmentation": terrain.LANDCOVER}


def chance(metrics: dict, metric: str) -> float | None:
  """The chance level of `metric` ("chance_bleu4" serves "greedy_bleu4", "chance_auc" "auc_itm")."""
  for key in (f"chance_{metric}", f"chance_{metric.split('_', 1)[-1]}", f"chance_{metric.split('_', 1)[0]}"):
    if key in metrics:
      return metrics[key]
  return None


def _fmt(value) -> str:
  return "—" if value is None or value != value else f"{value:.3f}"  # None, NaN: no level


def table(results: dict, details: dict) -> str:
  rows = ["| task | metric | this model | random init | chance / majority |", "|---|---|---|---|---|"]
  baseline = results.get("random_init", {})
  for task, metrics in results["tasks"].items():
    if "skipped" in metrics:
      reason = details.get(task, {}).get("skipped") or results.get("skipped", {}).get(task, "reason not recorded")
      rows.append(f"| {task} | skipped: {reason} | | | |")
      continue
    for metric in HEADLINES.get(task, ("accuracy",)):
      rows.append(f"| {task} | {metric} | {_fmt(metrics.get(metric))} | "
                  f"{_fmt(baseline.get(task, {}).get(metric))} | {_fmt(chance(metrics, metric))} |")
  return "\n".join(rows)


def settings_note(results: dict) -> list[str]:
  """report.md's lines on settings that differ between tasks (none when all agree), and on
  tasks merged from a results.json older than the settings record."""
  settings = results.get("settings", {})
  differ = config_lib.differing(settings)
  unrecorded = [t for t in results["tasks"] if t not in settings] if settings else []
  rows = []
  if differ:
    rows += ["These results merge `klip eval` runs made with different settings; each task's numbers "
             "were measured with its own (results.json `settings`):", "", "| setting | value: tasks |", "|---|---|"]
    for key, by_value in differ.items():
      rows.append(f"| {key} | " + "; ".join(f"{value}: {', '.join(tasks)}" for value, tasks in by_value.items())
                  + " |")
    rows.append("")
  if unrecorded:
    rows += [f"The settings of {', '.join(unrecorded)} were not recorded (evaluated by an older klip_jax): they "
             f"may differ from those of {', '.join(settings)}.", ""]
  return rows


def screening_table(per_field: dict, captions: str, skipped: frozenset[str] = frozenset()) -> str:
  """SCIO screening AUC per HCoT field (chance 0.5) on `captions` (which split's, said in the
  heading); image-blind fields are marked, and so are the `skipped` ones (config.scio.skip_fields),
  whose rule AUC is 0.5 by construction: the rule never flags them, what their signal ranks is
  in the decoder surprise column."""
  rows = [f"Screening AUC per HCoT field ({captions}; chance 0.500):", "",
          "| field | clauses | corrupted | ITC gain | ITM gain | decoder surprise | rule |",
          "|---|---|---|---|---|---|---|"]
  for field, m in per_field.items():
    blind = " (no chip can show it)" if tuple(field.split(".")) in knowledge.IMAGE_BLIND else ""
    blind += " (never flagged: scio.skip_fields)" if field in skipped else ""
    rows.append(f"| {field}{blind} | {m['clauses']} | {m['corrupted']} | {_fmt(m['auc_itc'])} | "
                f"{_fmt(m['auc_itm'])} | {_fmt(m.get('auc_decoder'))} | {_fmt(m['auc_rule'])} |")
  return "\n".join(rows)


# A flagged clause proofreading removed instead of rewriting (config.scio.rewrite_threshold).
_REMOVED = "(clause removed)"


def _flags(entries: list[dict]) -> list[tuple[dict, int, str, str]]:
  """Every flag of every entry, in order: (entry, clause, keyword as it was, as corrected)."""
  return [(e, *flag) for e in entries for flag in pipeline.entry_flags(e)]


def scio_examples(entries: list[dict], limit: int = 6) -> str:
  """Before/after of the first flagged clauses: the clause as it was, the keyword SCIO wrote,
  and the truth (the original keyword when the clause was clean)."""
  rows = ["| caption | clause before | rewritten keyword | true keyword | |", "|---|---|---|---|---|"]
  for e, k, original, corrected in _flags(entries)[:limit]:
    clause = e["caption"].split(knowledge.SEPARATOR)[k]
    corrupted = str(k) in e["truth"]
    true = e["truth"].get(str(k), original)
    if k in pipeline.dropped_clauses(e):
      corrected, verdict = _REMOVED, "removed" if corrupted else "clean, removed"
    else:
      verdict = ("repaired" if corrected == true else "flagged, not repaired") if corrupted else \
          ("clean, kept" if corrected == true else "clean, changed")
    rows.append(f"| {e['id']} | {clause} | {corrected} | {true} | {verdict} |")
  return "\n".join(rows)


def captions_diff(entries: list[dict], truth_recorded: bool, limit: int) -> list[str]:
  """`klip captions diff`: each flagged clause of a caption round with its original and
  corrected keyword, and its true keyword only where the data records one (the synthetic
  world's noise); ingested captions have no truth, so nothing is called correct there."""
  flags = _flags(entries)[:limit]
  lines = []
  for e, k, original, corrected in flags:
    clause = e["caption"].split(knowledge.SEPARATOR)[k]
    corrected = _REMOVED if k in pipeline.dropped_clauses(e) else repr(corrected)
    line = f"{e['id']}  clause {k}: {clause}\n    original: {original!r}  corrected: {corrected}"
    if truth_recorded:
      true = e["truth"].get(str(k))
      line += f"  true: {true!r}" if true is not None else f"  true: {original!r} (was correct)"
    lines.append(line)
  lines.append(f"{len(flags)} flagged clauses shown (limit {limit}); a flagged keyword may be kept as it was, "
               "or its clause removed")
  if not truth_recorded:
    lines.append("no true keywords: this data records no corrupted clauses (ingested captions carry no truth), "
                 "so whether a flagged keyword was wrong is unknown")
  return lines


def write(folder: io.PathLike, results: dict, details: dict, test, i2t_scores, metrics_path: io.PathLike, scio_config,
          relabel_entries: list[dict] | None = None) -> None:
  """report.md and the plots into `folder` (each written to a temp name, then renamed).

  `results` may merge several runs of one step (suite.merge): retrieval.png, which needs the
  scores only a retrieval run has (`i2t_scores`), is kept from the run that made it while the
  results still hold that run's retrieval entry; a plot nothing in `results` backs any more is
  removed, so no file describes a replaced entry."""
  plots, folder = [], io.path(folder)
  retrieval = results["tasks"].get("retrieval", {"skipped": 1.0})
  if i2t_scores is not None:
    plots.append(_save(folder, "retrieval.png", _retrieval_grid(test, i2t_scores)))
  elif "skipped" not in retrieval and (folder / "retrieval.png").exists():
    plots.append("retrieval.png")
  matrices = {t: details[t]["confusion"] for t in _CONFUSIONS if "confusion" in details.get(t, {})}
  if matrices:
    plots.append(_save(folder, "confusion.png", _confusions(matrices)))
  if io.exists(metrics_path):
    plots.append(_save(folder, "training_curves.png", _curves(metrics_path, scio_config)))
  for name in ("retrieval.png", "confusion.png", "training_curves.png"):
    if name not in plots and hosts.is_writer() and (folder / name).exists():
      (folder / name).unlink()
  questions = [f"- `{t}`: {d['question']}" for t, d in details.items() if "question" in d]
  text = [f"# Benchmark at step {results['step']}", "",
          "Held-out test split; probes, the detection head and answer vocabularies fitted on the "
          "train split. Chance: the level reached without the image (majority answer, random "
          "ranking, an image-blind detector, a random train caption).", "",
          table(results, details), "", *settings_note(results)]
  if questions:
    text += ["VQA questions (zero-shot, ranked answers):", *questions, ""]
  skipped = config_lib.skipped_fields(scio_config)
  if "per_field" in details.get("screening", {}):
    text += [screening_table(details["screening"]["per_field"], "val split's noisy captions, never trained on",
                             skipped), ""]
  if "per_field" in details.get("scio_repair", {}):
    text += [screening_table(details["scio_repair"]["per_field"],
                             "train split's noisy captions, the ones trained on and repaired", skipped), ""]
  repair = results["tasks"].get("scio_repair", {})
  if "max_screening_recall" in repair:
    most = scio_config.max_flags
    text += [f"SCIO flags at most {most} clause{'s' if most > 1 else ''} per caption per round, so screening "
             f"recall on this split cannot exceed {repair['max_screening_recall']:.3f} (corrupted clauses "
             f"within {most} per caption / corrupted clauses).", ""]
  if relabel_entries:
    text += ["SCIO before/after on train captions (`klip captions diff` shows a round the same way):", "",
             scio_examples(relabel_entries), ""]
  text += [f"![{name}]({name})" for name in plots]
  io.write_text(folder / "report.md", "\n".join(text) + "\n")


def _save(folder: io.PathLike, name: str, fig) -> str:
  with io.atomic_path(io.path(folder) / name) as tmp, tmp.open("wb") as f:
    fig.savefig(f, dpi=110, bbox_inches="tight", format="png")
  plt.close(fig)
  return name


def _retrieval_grid(test, scores: np.ndarray, rows: int = 6, top: int = 3):
  rows = min(rows, len(test))
  fig, axes = plt.subplots(rows, 2, figsize=(13, 2.3 * rows), gridspec_kw={"width_ratios": [1, 5]},
                           squeeze=False)
  for r in range(rows):
    image = builder.to_db(test.records[r]["image"])
    # NaN: no data (ingested float chips)
    axes[r, 0].imshow(image, cmap="gray", vmin=np.nanpercentile(image, 2), vmax=np.nanpercentile(image, 98))
    axes[r, 0].set_title(test.records[r]["id"], fontsize=7)
    axes[r, 0].axis("off")
    axes[r, 1].axis("off")
    for k, j in enumerate(np.argsort(-scores[r], kind="stable")[:top]):
      mark = "correct" if j == r else "wrong"
      text = textwrap.shorten(test.captions[j].replace("$", " | "), 230)
      axes[r, 1].text(0, 1 - 0.34 * k, f"#{k + 1} [{mark}] " + "\n".join(textwrap.wrap(text, 125)),
                      va="top", fontsize=7, color="green" if j == r else "firebrick",
                      transform=axes[r, 1].transAxes)
  fig.suptitle("Test chips and their top captions (ITC top-k, ITM re-ranked)", y=0.995)
  fig.subplots_adjust(top=0.95, hspace=0.35)
  return fig


def _confusions(matrices: dict):
  fig, axes = plt.subplots(1, len(matrices), figsize=(5.2 * len(matrices), 4.6), squeeze=False)
  for ax, (task, matrix) in zip(axes[0], matrices.items()):
    m = np.asarray(matrix, float)
    shown = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    names = _CONFUSIONS[task]
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for (i, j), v in np.ndenumerate(shown):
      if m[i].sum():
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(task)
  fig.tight_layout()
  return fig


def _curves(metrics_path: io.PathLike, scio_config):
  """Training losses and accuracies, and the in-training evaluations' headline metrics."""
  lines = io.read_jsonl(metrics_path)
  logged = [m for m in lines if "eval" not in m]
  evals = [m for m in lines if "eval" in m]
  panels = [("losses", logged, ("loss", "loss_itc", "loss_itm", "loss_recon")),
            ("accuracies", logged, ("itc_acc", "itm_acc", "itm_balanced_acc", "itm_auc", "recon_acc"))]
  if evals:
    headline = {t: HEADLINES.get(t, ("accuracy",))[0] for m in evals for t in m["eval"]}
    flat = [{"step": m["step"], **{f"{t}/{k}": m["eval"].get(t, {}).get(k, np.nan) for t, k in headline.items()}}
            for m in evals]
    panels.append(("in-training evaluation (val split)", flat, tuple(f"{t}/{k}" for t, k in headline.items())))
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4))
  bounds = scio.stage_bounds(scio_config) if scio.total_steps(scio_config) else {}
  for ax, (title, rows, keys) in zip(axes, panels):
    steps = np.asarray([m["step"] for m in rows])
    for key in keys:
      ax.plot(steps, [m.get(key, np.nan) for m in rows], label=key, marker="o" if rows is not logged else None)
    for (stage, (a, b)), colour in zip(bounds.items(), ("none", "tab:orange", "tab:green")):
      if b > a and stage != "A":
        ax.axvspan(a, b, color=colour, alpha=0.1, label=f"stage {stage}")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig
