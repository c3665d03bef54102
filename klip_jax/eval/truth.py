"""The examples an evaluator reads, with their ground truth: records in split order, their
model inputs, and the TRUE text.

Caption noise (the synthetic world's, or real captions with recorded corrections) is undone
here: a corrupted clause gets its true keyword back, so retrieval, captioning and VQA are
scored against what the image shows, not against what the noisy caption said. Images are
normalised exactly as the training pipeline does (dB, train-split statistics).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from klip_jax import config as config_lib
from klip_jax.data import builder, pipeline, prepare, records
from klip_jax.data.tokenizer import TextCodec
from klip_jax.errors import DatasetError, KlipError


class NoTruth(ValueError):
  """A task's ground truth is absent from the split (e.g. real data without land cover): the
  benchmark reports the task as skipped with this message."""


def corruption_missing(data_dir: str, split: str, limit: int) -> str | None:
  """None when the first `limit` records of `split` record a corrupted clause (the truth that
  screening and repair are scored against); otherwise why none does. Real captions are noisy
  too, but nobody has marked which of their clauses are wrong."""
  source = builder.open_split(data_dir, split)
  count = min(len(source), limit)
  for i in range(count):
    if len(records.from_example(source[i], decode_rasters=False)["truth"]["corrupted"]):
      return None
  settings = builder.metadata(data_dir).get("settings", {})
  if "noise_rate" not in settings:
    why = ("ingested captions carry no record of which clause is wrong, so screening and repair have nothing "
           "to be graded against")
  elif settings["noise_rate"] == 0:
    why = "the synthetic world was built with noise_rate 0, so no clause is wrong"
  else:
    why = f"the synthetic world's caption noise (noise_rate {settings['noise_rate']}) corrupted none of them"
  return f"none of the first {count} {split} captions records a corrupted clause: {why}"


def corruption_recorded(workdir: str, limit: int = 1024) -> bool | None:
  """Whether the dataset of a workdir's run records corrupted clauses (None: its saved config
  or dataset cannot be found)."""
  try:
    data = prepare.locate(config_lib.load_saved(os.path.join(workdir, "config.json")), workdir)
    return corruption_missing(data.data_dir, "train", limit) is None
  except KlipError:
    return None


@dataclasses.dataclass
class Split:
  name: str
  records: list[dict]  # decoded records (raw image, geo, truth), split order
  images: np.ndarray  # float32 [N, H, W, 1], normalised
  keywords: list[list[str]]  # true keyword of every clause
  captions: list[str]  # true captions
  text_ids: np.ndarray  # int32 [N, L], [CLS] first

  def __len__(self) -> int:
    return len(self.records)

  def head(self, n: int) -> Split:
    """The first n examples."""
    return Split(self.name, self.records[:n], self.images[:n], self.keywords[:n], self.captions[:n],
                 self.text_ids[:n])


def load_split(data_dir: str, split: str, codec: TextCodec, limit: int = 0) -> Split:
  """The first `limit` examples of a split (all when 0)."""
  source = builder.open_split(data_dir, split)
  count = len(source) if limit <= 0 else min(limit, len(source))
  if count == 0:
    raise DatasetError(f"split {split!r} of {data_dir} is empty; evaluation needs examples there.")
  stats = builder.metadata(data_dir)
  recs = [records.from_example(source[i]) for i in range(count)]
  sizes = {r["image"].shape for r in recs}
  if len(sizes) > 1:
    raise DatasetError(f"split {split!r} mixes image sizes {sorted(sizes)}; evaluation batches "
                       "need one size (re-chip the data to one size).")
  texts = [records.true_text(r) for r in recs]
  return Split(
      name=split, records=recs,
      images=np.stack([pipeline.normalise(r["image"], stats["db_mean"], stats["db_std"]) for r in recs]),
      keywords=[k for k, _, _ in texts], captions=[c for _, c, _ in texts],
      text_ids=np.stack([codec.encode(c, s).ids for _, c, s in texts]))
