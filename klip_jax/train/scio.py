"""SCIO around the pure relabel step: stages, relabelling a whole split, caption overlays,
and repair metrics against the corruption ground truth.

Overlays (`WORKDIR/captions/round_K/overlay.jsonl`, one JSON line per example id) are written
to a temporary folder and renamed, and never overwritten, so every round stays auditable and
`klip captions diff` can show what each round changed.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
from tqdm import tqdm

from klip_jax import io
from klip_jax.data import builder, knowledge, pipeline, records
from klip_jax.data.prepare import RunData
from klip_jax.data.tokenizer import TextCodec, TokenIds
from klip_jax.errors import ConfigError, KlipError
from klip_jax.parallel import hosts
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import relabel as relabel_lib
from klip_jax.train.step import RECON_KEYS, model_inputs

STAGES = ("A", "B", "C")


def stage_bounds(scio) -> dict[str, tuple[int, int]]:
  """Stage -> [first step, end step) in train steps."""
  a, b, c = scio.stage_a_steps, scio.stage_b_steps, scio.stage_c_steps
  return {"A": (0, a), "B": (a, a + b), "C": (a + b, a + b + c)}


def total_steps(scio) -> int:
  return scio.stage_a_steps + scio.stage_b_steps + scio.stage_c_steps


def reconstruction_inputs(local_batch: dict, config, stage: str) -> dict:
  """A host's batch with the reconstruction target spelled out in every stage: the caption the
  decoder reconstructs (stage B's removal round brings its own, the caption without its flagged
  clauses; A and C reconstruct the caption itself) and each example's rate of extra ordinary
  positions (stage C's config.scio.stage_c_extra_mask_rate, else config.loss.extra_mask_rate).
  One batch structure in every stage lets A, B and C share one compiled train step; a structure
  or a constant that changed per stage compiled it three times (~18 s each on configs/demo.py).
  Online stage B and C overwrite the target after relabelling (`train.loop`)."""
  out = dict(local_batch)
  for recon, own in RECON_KEYS.items():
    out.setdefault(recon, local_batch[own])
  rate = config.scio.stage_c_extra_mask_rate if stage == "C" else config.loss.extra_mask_rate
  out["recon_extra_rate"] = np.full(len(local_batch["text_ids"]), rate, np.float32)
  return out


def stage_of(step: int, scio) -> str:
  for name, (start, end) in stage_bounds(scio).items():
    if start <= step < end:
      return name
  return "C"


def validate(config) -> None:
  s = config.scio
  if s.mode not in ("online", "offline"):
    raise ConfigError(f"config.scio.mode={s.mode!r}: use 'online' or 'offline'.")
  if min(s.stage_a_steps, s.stage_b_steps, s.stage_c_steps) < 0:
    raise ConfigError("config.scio.stage_*_steps must be >= 0.")
  if total_steps(s) != config.train.steps:
    raise ConfigError(f"config.scio stages sum to {total_steps(s)} steps but config.train.steps="
                      f"{config.train.steps}; make them equal.")


def overlay_path(workdir: str, round_index: int) -> str:
  return str(io.path(workdir) / "captions" / f"round_{round_index}" / "overlay.jsonl")


def rounds(workdir: str) -> list[int]:
  folder = io.path(workdir) / "captions"
  if not folder.is_dir():
    return []
  names = [p.name for p in folder.iterdir()]  # a folder being written is .round_K.tmp-*: not listed
  return sorted(int(n.split("_")[1]) for n in names if n.startswith("round_") and n.split("_")[1].isdigit())


def write_overlay(workdir: str, round_index: int, entries: list[dict]) -> str:
  """Write round K atomically (process 0 writes, every process returns once it is there);
  refuse to overwrite an existing round."""
  path = overlay_path(workdir, round_index)
  folder = io.path(path).parent
  if hosts.is_writer():
    if folder.exists():
      raise KlipError(f"{folder} already exists; caption rounds are never overwritten "
                      "(delete it yourself if you really mean to redo that round).")
    with io.atomic_path(folder) as tmp:
      tmp.mkdir()
      io.write_jsonl(tmp / "overlay.jsonl", entries)
  hosts.sync(f"caption round {round_index}")
  return path


# Offline SCIO: the caption round each stage reads, and how.
STAGE_OVERLAY = {"B": (1, "recon"), "C": (2, "caption")}


def train_pipeline(config, data: RunData, overlay: str = "", overlay_use: str = ""):
  """The training pipeline (shuffled, augmented), optionally reading a caption overlay."""
  c = config
  return pipeline.build(pipeline.PipelineOptions(
      data.data_dir, "train", c.train.batch_size, seed=c.seed, worker_count=c.data.worker_count,
      read_threads=c.data.read_threads,
      flip=c.data.flip, gain_jitter_db=c.data.gain_jitter_db, overlay=overlay,
      overlay_use=overlay_use, clause_negatives=c.data.clause_negatives,
      clause_dropout=c.data.clause_dropout, limit=c.data.train_examples), data.codec)


def stage_pipeline(config, data: RunData, workdir: str, stage: str):
  """The train pipeline of a stage (offline SCIO stages read their caption overlay)."""
  if config.scio.mode == "offline" and stage in STAGE_OVERLAY:
    round_index, use = STAGE_OVERLAY[stage]
    path = overlay_path(workdir, round_index)
    if io.exists(path):
      return train_pipeline(config, data, path, use)
  return train_pipeline(config, data)


def enter_offline_stage(config, data: RunData, workdir: str, stage: str, relabel, params, iterator, mesh):
  """Write the stage's caption round unless an earlier (interrupted) run did, and continue the
  data iterator, from where it stands, on the pipeline that reads that round."""
  round_index, _ = STAGE_OVERLAY[stage]
  if not io.exists(overlay_path(workdir, round_index)):
    entries = relabel_split(relabel, params, data, "train", mesh, config.scio.relabel_batch_size,
                            limit=config.data.train_examples)
    write_overlay(workdir, round_index, entries)
  position = iterator.get_state()
  iterator = iter(stage_pipeline(config, data, workdir, stage))
  iterator.set_state(position)
  return iterator


def field_values(data: RunData, split: str = "train") -> dict[tuple[str, str], collections.Counter]:
  """How often each keyword value occurs per (scene type, field) in a split's captions."""
  source = builder.open_split(data.data_dir, split)
  counts = collections.defaultdict(collections.Counter)
  for i in range(len(source)):
    record = records.from_example(source[i], decode_rasters=False)
    for name, keyword in zip(record["field_names"], record["keywords"]):
      counts[(record["scene_type"], name)][keyword] += 1
  return counts


def field_candidates(data: RunData, max_candidates: int, split: str = "train") -> relabel_lib.FieldCandidates:
  """The closed vocabularies proofreading may choose from (config.scio.candidates): per HCoT
  field, its distinct keywords in `split` when there are at most `max_candidates` of them
  (most frequent first), as token ids; a field with more (cell lists, cities, lengths) has
  none and is generated freely. Read from the data, so real captions get their own."""
  counts = field_values(data, split)
  pieces = [[data.codec.pieces(keyword)[0] for keyword, _ in counts[slot].most_common()]
            if 0 < len(counts[slot]) <= max_candidates else [] for slot in knowledge.FIELD_SLOTS]
  width = max((len(p) for values in pieces for p in values), default=1)
  ids = np.zeros((len(pieces), max_candidates, width), np.int32)
  lengths = np.zeros((len(pieces), max_candidates), np.int32)
  for f, values in enumerate(pieces):
    for c, p in enumerate(values):
      ids[f, c, :len(p)], lengths[f, c] = p, len(p)
  return relabel_lib.FieldCandidates(ids, lengths)


def relabel_steps(config, graph, tokens: TokenIds, params_shardings, mesh, data: RunData,
                  stages=("B", "C"), every_signal: bool = False) -> dict:
  """The jitted relabel step of each SCIO stage (B screens only, C proofreads too), with the
  field candidates when config.scio.candidates asks for them and a stage proofreads (reading
  them takes a pass over the train split's records). Training scores only the signals its rule
  reads; `every_signal` scores them all (evaluation)."""
  proofreads = "C" in stages and config.scio.candidates
  candidates = field_candidates(data, config.scio.max_candidates) if proofreads else None
  return {stage: relabel_lib.make_relabel_step(config, graph, tokens, params_shardings, mesh,
                                               proofread=stage == "C", candidates=candidates,
                                               every_signal=every_signal)
          for stage in stages}


def _keyword_text(codec: TextCodec, ids: np.ndarray, mask: np.ndarray) -> str:
  return codec.sp.decode([int(i) for i in ids[mask]]).strip()


def entries_from_result(codec: TextCodec, result, indices: np.ndarray, valid: np.ndarray,
                        source) -> list[dict]:
  """Host side of a relabel batch (`result`, `indices` and `valid` fetched whole: all rows of
  the global batch, on every host): one auditable entry per real example."""
  entries = []
  for row in np.flatnonzero(valid):
    record = records.from_example(source[int(indices[row])], decode_rasters=False)
    flagged = [int(k) for k in result.flagged[row] if k >= 0]
    dropped = [int(k) for k, d in zip(result.flagged[row], result.dropped[row]) if k >= 0 and d]
    entry = {"id": record["id"], "index": int(indices[row]), "scene_type": record["scene_type"],
             "caption": record["caption"],
             "flagged": flagged, "dropped": dropped, "itc": np.round(result.itc[row], 5).tolist(),
             "itm": np.round(result.itm[row], 5).tolist(),
             "score": np.round(np.where(result.valid[row], result.score[row], np.nan), 5).tolist(),
             "surprise": np.round(np.where(result.valid[row], result.surprise[row], np.nan), 5).tolist(),
             "original_keyword": [record["keywords"][k] for k in flagged],
             "corrected_keyword": [_keyword_text(codec, result.corrected_ids[row],
                                                 result.fill_mask[row] & (result.corrected_clause_ids[row] == k))
                                   for k in flagged]}
    truth = record["truth"]
    # Keys are clause indices as strings, as they are after a JSON round trip.
    entry["truth"] = {str(i): kw for i, kw in zip(truth["corrupted"].tolist(), truth["true_keywords"])}
    entries.append(entry)
  return entries


def relabel_split(relabel, params, data: RunData, split: str, mesh, batch_size: int,
                  progress: bool = True, limit: int = 0) -> list[dict]:
  """Run the jitted relabel step over a whole split, or its first `limit` examples (the ones a
  run trains on); no shuffle, no augmentation; every host returns the entries of all of them."""
  source = builder.open_split(data.data_dir, split)
  options = pipeline.PipelineOptions(data.data_dir, split, batch_size, train=False, limit=limit)
  entries = []
  with tqdm(total=limit or len(source), desc=f"relabel {split}", unit="caption", disable=not progress) as bar:
    for batch in pipeline.build(options, data.codec):
      # The last batch's padding rows (copies of example 0) get no clauses: no variant of theirs
      # is valid, so they flag nothing and stay out of the batch statistics that screening
      # standardises by (scio.field_calibration, the relative rule), which would otherwise
      # change the real captions' flags.
      clause_ids = np.where(batch["valid"][:, None], batch["clause_ids"], -1)
      # index and valid travel as global arrays too, so they line up with the result's rows.
      inputs = pipeline.global_batch({**model_inputs(batch), "clause_ids": clause_ids,
                                      "index": batch["index"].astype(np.int32), "valid": batch["valid"]}, mesh)
      result = relabel(params, model_inputs(inputs), jax.random.key(0))
      result, index, valid = hosts.fetch((result, inputs["index"], inputs["valid"]))
      new = entries_from_result(data.codec, result, index, valid, source)
      entries += new
      bar.update(len(new))
  return entries


def restored_relabel_step(config, graph, params, tokens: TokenIds, mesh, data: RunData, *,
                          proofread: bool = True, every_signal: bool = False):
  """The jitted relabel step for parameters sharded as `params` are (restored or in training);
  build it once and reuse it: every new one compiles anew."""
  stage = "C" if proofread else "B"
  return relabel_steps(config, graph, tokens, mesh_lib.shardings_of(params), mesh, data, (stage,),
                       every_signal)[stage]


def relabel_restored(config, relabel, params, data: RunData, split: str, mesh, *,
                     progress: bool = True) -> list[dict]:
  """One relabel pass over a split with `relabel` (`restored_relabel_step`): klip relabel,
  evaluation."""
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    return relabel_split(relabel, params, data, split, mesh, config.scio.relabel_batch_size, progress)


def repair_metrics(entries: list[dict], max_flags: int = 1) -> dict:
  """What SCIO did to a split's captions against the truth, over every flag of every entry
  (`max_flags`: the most a caption could get, config.scio.max_flags):
  - screening precision and recall against the truly corrupted clauses (every flag counts);
  - proofreading, over the flags it rewrote: corrupted keywords restored to their true value,
    and clean clauses changed; flags it removed instead (config.scio.rewrite_threshold) are
    counted apart, corrupted and clean;
  - the share of wrong clauses in the captions before and after (wrong after: corrupted clauses
    neither restored nor removed, plus clean ones changed, over the clauses left)."""
  flags = [(e, clause, original, corrected, clause in pipeline.dropped_clauses(e))
           for e in entries for clause, original, corrected in pipeline.entry_flags(e)]
  corrupted = sum(len(e["truth"]) for e in entries)
  clauses = sum(len(e["caption"].split(knowledge.SEPARATOR)) for e in entries)
  is_corrupted = lambda e, k: str(k) in e["truth"]
  true_flags = [f for f in flags if is_corrupted(*f[:2])]
  rewritten = [f for f in flags if not f[4]]
  restored = sum(corrected == e["truth"][str(k)] for e, k, _, corrected, _ in rewritten if is_corrupted(e, k))
  rewritten_corrupted = sum(is_corrupted(e, k) for e, k, *_ in rewritten)
  clean_changed = sum(corrected != original for e, k, original, corrected, _ in rewritten if not is_corrupted(e, k))
  dropped = len(flags) - len(rewritten)
  dropped_corrupted = len(true_flags) - rewritten_corrupted
  clean = max(clauses - corrupted, 1)
  wrong_before = corrupted / max(clauses, 1)  # also what flagging at random reaches in precision
  return {"captions": len(entries), "corrupted_clauses": corrupted, "flagged": len(flags),
          "screening_precision": len(true_flags) / max(len(flags), 1),
          "chance_screening_precision": wrong_before,
          "screening_recall": len(true_flags) / max(corrupted, 1),
          # As many clauses as screening flagged, flagged at random; and the most max_flags per caption reach.
          "chance_screening_recall": len(flags) / max(clauses, 1),
          "max_screening_recall": sum(min(len(e["truth"]), max_flags) for e in entries) / max(corrupted, 1),
          "rewritten": len(rewritten),
          "proofreading_accuracy": restored / max(rewritten_corrupted, 1),
          "clean_clauses_changed": clean_changed,
          "clean_clauses_changed_rate": clean_changed / clean,
          "removed": dropped, "corrupted_clauses_removed": dropped_corrupted,
          "clean_clauses_removed_rate": (dropped - dropped_corrupted) / clean,
          "wrong_clause_rate_before": wrong_before,
          "wrong_clause_rate_after": (corrupted - restored - dropped_corrupted + clean_changed)
                                     / max(clauses - dropped, 1)}
