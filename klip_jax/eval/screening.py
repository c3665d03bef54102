"""How well SCIO's screening signals single out corrupted caption clauses, read from relabel
entries (`train.scio.entries_from_result`) alone: no model is run.

Screening scores every leave-one-clause-out variant of a caption against its image by ITC
similarity and ITM match probability, and each clause's keyword by the decoder's surprise
(-log p of the keyword given the image and the caption before it); the configured rule
(`train.relabel.rule_score`) turns these into a score per clause, flagging the best clauses
(`config.scio.max_flags` at most) whose score is positive.
Per clause, each score's gain from removing it, the rule's score and the flag itself are
ranked against which clauses were truly corrupted: their ROC AUCs show whether a
signal orders corrupted clauses first, whatever threshold the rule puts on it. Only real
variants count: clause k < the caption's clause count, in captions of at least 2 clauses (a
caption's only clause is never removed; the table slots past its clauses hold meaningless
scores). Each HCoT field is also scored on its own (`per_field`, in details.json): a field no
chip can show (`knowledge.IMAGE_BLIND`: a target scene's city and country, from speckle) is reported
apart instead of being averaged into what the image can show.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from klip_jax.data import knowledge, pipeline
from klip_jax.eval import metrics
from klip_jax.eval.truth import NoTruth

SIGNALS = {"itc": "itc_gain", "itm": "itm_gain", "decoder": "surprise", "rule": "rule", "flagged": "flagged"}


def clause_table(entries: Sequence[dict]) -> dict:
  """One row per screened clause, as arrays: `caption` (entry index), `clause` (k), `corrupted`,
  `itc_gain` itc[1 + k] - itc[0], `itm_gain` likewise, `rule` the relabel rule's own score
  (entries' `score`; min of the two gains, the paper rule's form, for entries without one),
  `surprise` the decoder's -log p of the clause's keyword (NaN for entries written before
  screening recorded it), `flagged` (1 where the entry flagged clause k) and `field`
  ("scene_type.field", "" when the entry does not say its scene type). Clauses past the tables'
  width (max_clauses) have no variant and are left out like those of one-clause captions, and so
  are clauses the relabel step found no tokens of (a caption cut at data.max_len: NaN `score`)."""
  columns = {name: [] for name in ("caption", "clause", "corrupted", "itc_gain", "itm_gain", "surprise",
                                   "rule", "flagged", "field")}
  for index, entry in enumerate(entries):
    itc, itm = np.asarray(entry["itc"], np.float64), np.asarray(entry["itm"], np.float64)
    count = min(len(entry["caption"].split(knowledge.SEPARATOR)), len(itc) - 1)
    if count < 2:
      continue
    clauses = np.arange(count)
    if "score" in entry:
      clauses = clauses[~np.isnan(np.asarray(entry["score"], np.float64)[:count])]
    if not len(clauses):
      continue
    columns["caption"].append(np.full(len(clauses), index))
    columns["clause"].append(clauses)
    columns["corrupted"].append(np.asarray([str(k) in entry["truth"] for k in clauses], bool))
    columns["itc_gain"].append(itc[1 + clauses] - itc[0])
    columns["itm_gain"].append(itm[1 + clauses] - itm[0])
    columns["surprise"].append(np.asarray(entry["surprise"], np.float64)[clauses] if "surprise" in entry
                               else np.full(len(clauses), np.nan))
    columns["rule"].append(np.asarray(entry["score"], np.float64)[clauses] if "score" in entry
                           else np.minimum(columns["itc_gain"][-1], columns["itm_gain"][-1]))
    columns["flagged"].append(np.isin(clauses, pipeline.flagged_clauses(entry)).astype(np.int64))
    names = knowledge.FIELDS.get(entry.get("scene_type", ""), ())
    columns["field"].append(np.asarray([f"{entry['scene_type']}.{names[k]}" if k < len(names) else ""
                                        for k in clauses], dtype=object))
  dtypes = {"caption": np.int64, "clause": np.int64, "corrupted": bool, "flagged": np.int64, "field": object}
  table = {name: np.concatenate(parts) if parts else np.zeros(0, dtypes.get(name, np.float64))
           for name, parts in columns.items()}
  return table


def evaluate(entries: Sequence[dict]) -> dict:
  """ROC AUC of each screening signal for corrupted vs clean clauses, over the screened clauses."""
  table = clause_table(entries)
  corrupted = table["corrupted"]
  if not corrupted.any():
    raise NoTruth("no screened clause (clause of a caption with 2 or more) is recorded as corrupted")
  if corrupted.all():
    raise NoTruth("every screened clause is recorded as corrupted; screening AUC needs clean ones")
  signals = {name: column for name, column in SIGNALS.items() if not np.isnan(table[column]).any()}
  out = {f"auc_{name}": metrics.roc_auc(table[column], corrupted) for name, column in signals.items()}
  out.update(chance_auc=metrics.CHANCE_AUC, corrupted_rate=float(corrupted.mean()),
             clauses=len(corrupted))
  blind = np.isin(table["field"], [f"{scene}.{field}" for scene, field in knowledge.IMAGE_BLIND])
  for name, rows in (("visible", ~blind & (table["field"] != "")), ("image_blind", blind)):
    if corrupted[rows].any() and not corrupted[rows].all():
      out[f"auc_rule_{name}"] = metrics.roc_auc(table["rule"][rows], corrupted[rows])
  out["per_field"] = {
      field: {"clauses": int(rows.sum()), "corrupted": int(corrupted[rows].sum()),
              **{f"auc_{name}": metrics.roc_auc(table[column][rows], corrupted[rows])
                 for name, column in signals.items()}}
      for field in sorted(set(table["field"]) - {""}) for rows in [table["field"] == field]}
  return out
