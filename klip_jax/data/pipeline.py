"""grain input pipelines: ArrayRecord split -> per-host batches -> global jax.Arrays.

Train: a seeded global stream that draws a fresh permutation of the whole split every epoch;
decode; augmentation that keeps the text true (flips transform the position and orientation
keywords with the image; a radiometric gain jitter changes nothing the text says), drawn per
stream position; SAR-aware normalisation (amplitude -> dB -> standardised with the train
split's statistics; no-data pixels -> 0); tokenisation with keyword mask and clause ids; then
each host takes its part of every global batch (`HostRows`), so the global batches are the
same on 1 host or N; batching; multiprocessing prefetch. The iterator's state
(`get_state`/`set_state`, or grain's orbax handlers) makes a restarted run read exactly the
batches an uninterrupted run would.

Eval: no shuffle, no augmentation; the split in order, padded to whole global batches (every
host makes the same number of calls) with a `valid` mask saying which rows are real.
"""

from __future__ import annotations

import dataclasses
import sys

import grain
import jax
import numpy as np
from absl import flags

from klip_jax import io
from klip_jax.data import builder, knowledge, records
from klip_jax.data.tokenizer import TextCodec
from klip_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """What a pipeline reads and how (the data part of a run's config)."""

  data_dir: str
  split: str
  batch_size: int  # global batch; each host reads batch_size // process_count
  seed: int = 0
  train: bool = True
  num_epochs: int | None = None  # None: repeat forever (train)
  flip: bool = True  # train-time flips with their text transform
  gain_jitter_db: float = 1.0  # train-time radiometric gain jitter (+- dB)
  worker_count: int = 0  # grain multiprocessing workers (0: in-process)
  # A SCIO caption overlay (captions/round_K/overlay.jsonl) and how to use it: "recon" adds the
  # caption minus the flagged clauses as recon_* features (stage B); "caption" puts the corrected
  # keywords into the caption (stage C).
  overlay: str = ""
  overlay_use: str = ""
  # Train-time text extensions beyond the paper (config.data): a one-clause-wrong copy of each
  # caption as an ITM negative (neg_text_ids), and dropping one clause with this probability so
  # SCIO's leave-one-clause-out variants are in distribution.
  clause_negatives: bool = False
  clause_dropout: float = 0.0
  limit: int = 0  # read only the split's first `limit` examples (0: all): nested data subsets
  read_threads: int = 1  # threads running the per-example work (config.data.read_threads: why 1)
  prefetch_buffer: int = 4  # batches


class GlobalShuffle(grain.MapDataset):
  """Position q of the global stream is item permutation(seed, epoch)[q % N] of the N-item
  parent, epoch = q // N: every epoch a fresh permutation of the whole split, the same stream
  whatever the number of hosts (`HostRows` deals it out)."""

  def __init__(self, parent: grain.MapDataset, *, seed: int, num_epochs: int | None):
    super().__init__(parent)
    self._seed, self._num_epochs = seed, num_epochs
    self._cached_epoch, self._cached_perm = -1, None

  def __len__(self) -> int:
    return sys.maxsize if self._num_epochs is None else len(self._parent) * self._num_epochs

  def __str__(self) -> str:
    return f"GlobalShuffle(seed={self._seed})"

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._cached_epoch:
      rng = np.random.default_rng([self._seed, epoch])
      self._cached_epoch, self._cached_perm = epoch, rng.permutation(len(self._parent))
    return self._cached_perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, position = divmod(index, len(self._parent))
    return self._parent[int(self._permutation(epoch)[position])]


class PaddedToBatches(grain.MapDataset):
  """An (index, example) split padded to whole global batches: the positions past its end are
  copies of its first example with index -1 (`valid` false), so every host makes the same
  number of calls and the last batch compiles like the others."""

  def __init__(self, parent: grain.MapDataset, batch_size: int):
    super().__init__(parent)
    self._length = -(-len(parent) // batch_size) * batch_size

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return f"PaddedToBatches({self._length})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if index < len(self._parent):
      return self._parent[index]
    return -1, self._parent[0][1]


class HostRows(grain.MapDataset):
  """This host's rows of each global batch: global batch g is stream positions [g B, (g + 1) B)
  and host h of P reads the h-th of its P equal parts, which is where
  `jax.make_array_from_process_local_data` puts them. So the global batches, and the random
  augmentation drawn per stream position, are the same for any number of hosts, and a
  checkpoint's iterator position (a batch count) means the same on any number of hosts."""

  def __init__(self, parent: grain.MapDataset, *, batch_size: int, process_index: int, process_count: int):
    super().__init__(parent)
    self._global, self._per_host = batch_size, batch_size // process_count
    self._offset = process_index * self._per_host

  def __len__(self) -> int:
    return len(self._parent) // self._global * self._per_host

  def __str__(self) -> str:
    return f"HostRows(offset={self._offset}, per_host={self._per_host})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, self._per_host)
    return self._parent[batch * self._global + self._offset + row]


class _IndexedSource:
  """A split's first `length` examples as (index, example) pairs: the index identifies the
  example across epochs."""

  def __init__(self, source, length: int):
    self._source, self._length = source, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    if not 0 <= index < self._length:
      raise IndexError(f"example {index} of a {self._length}-example source")
    return index, self._source[index]


def normalise(amplitude: np.ndarray, db_mean: float, db_std: float) -> np.ndarray:
  """Amplitude (uint16, or float32 with NaN where there is no data) -> standardised dB, float32
  [H, W, 1]; no-data pixels become 0, the train split's mean, so they carry no signal."""
  image = ((builder.to_db(amplitude) - db_mean) / db_std)[..., None].astype(np.float32)
  if np.issubdtype(amplitude.dtype, np.floating):
    image = np.nan_to_num(image, nan=0.0)
  return image


def flip(record: dict, axis: str) -> dict:
  """Flip a record's image along `axis` and rewrite its caption to stay true; a record whose
  positions are free text (`knowledge.flip_keyword` is None: real captions) is left unflipped,
  since its caption would describe the image before the flip."""
  keywords = [knowledge.flip_keyword(record["scene_type"], name, keyword, axis)
              for name, keyword in zip(record["field_names"], record["keywords"])]
  if None in keywords:
    return record
  image = record["image"][::-1] if axis == "vertical" else record["image"][:, ::-1]
  caption, spans = knowledge.replace_keywords(record["caption"], record["spans"], keywords)
  return {**record, "image": np.ascontiguousarray(image), "keywords": keywords,
          "caption": caption, "spans": np.asarray(spans, np.int32)}


def remove_clause(caption: str, spans, index: int) -> tuple[str, list[tuple[int, int]]]:
  """The caption without clause `index` (and its separator), with the other keyword spans."""
  clauses = caption.split(knowledge.SEPARATOR)
  starts = np.cumsum([0] + [len(c) + len(knowledge.SEPARATOR) for c in clauses[:-1]])
  kept = [i for i in range(len(clauses)) if i != index]
  text, new_spans, offset = [], [], 0
  for i in kept:
    a, b = spans[i]
    new_spans.append((offset + a - starts[i], offset + b - starts[i]))
    text.append(clauses[i])
    offset += len(clauses[i]) + len(knowledge.SEPARATOR)
  return knowledge.SEPARATOR.join(text), new_spans


def drop_clause(record: dict, index: int) -> dict:
  """The record with clause `index` removed from its caption, keywords and field names."""
  caption, spans = remove_clause(record["caption"], record["spans"], index)
  keep = lambda items: [x for i, x in enumerate(items) if i != index]
  return {**record, "caption": caption, "spans": np.asarray(spans, np.int32),
          "keywords": keep(record["keywords"]), "field_names": keep(record["field_names"])}


def flagged_clauses(entry: dict) -> list[int]:
  """The clauses a relabel entry flagged, best first. Entries list them ("flagged": [k, ...]);
  rounds written when SCIO flagged one clause at most hold one index (-1: none)."""
  flagged = entry["flagged"]
  return ([flagged] if flagged >= 0 else []) if isinstance(flagged, int) else list(flagged)


def entry_flags(entry: dict) -> list[tuple[int, str, str]]:
  """A relabel entry's flags as (clause, keyword as it was, keyword as corrected), best first
  (keywords are listed like the clauses, or single strings in one-flag rounds)."""
  clauses = flagged_clauses(entry)
  listed = lambda x: x if isinstance(x, list) else [x][:len(clauses)]
  return list(zip(clauses, listed(entry["original_keyword"]), listed(entry["corrected_keyword"])))


def dropped_clauses(entry: dict) -> set[int]:
  """The flagged clauses proofreading removed instead of rewriting (config.scio.rewrite_threshold);
  rounds written before it existed list none."""
  return set(entry.get("dropped", ()))


@dataclasses.dataclass
class _Decode:
  overlay: dict  # example id -> relabel entry (`entry_flags`)
  use: str

  def __call__(self, item):
    index, example = item
    # The chip only: the truth rasters are the evaluators' (read from the split), not the model's.
    record = records.from_example(example, decode_rasters=False)
    record["image"] = records.decode_image(record["image"])
    entry = self.overlay.get(record["id"]) if self.overlay else None
    flags = entry_flags(entry) if entry else []
    if self.use == "caption" and flags:
      dropped = dropped_clauses(entry)
      keywords = list(record["keywords"])
      for clause, _, corrected in flags:
        keywords[clause] = keywords[clause] if clause in dropped else corrected
      caption, spans = knowledge.replace_keywords(record["caption"], record["spans"], keywords)
      record = {**record, "caption": caption, "spans": np.asarray(spans, np.int32), "keywords": keywords}
      for clause in sorted(dropped, reverse=True):  # the others keep their index
        record = drop_clause(record, clause)
    if self.use == "recon":
      record = {**record, "recon_clauses": [clause for clause, _, _ in flags]}
    return index, record


@dataclasses.dataclass
class _Augment:
  flip: bool
  gain_jitter_db: float
  clause_negatives: bool = False
  clause_dropout: float = 0.0

  def __call__(self, item, rng: np.random.Generator):
    index, record = item
    if self.flip:
      for axis in ("vertical", "horizontal"):
        if rng.uniform() < 0.5:
          record = flip(record, axis)
    gain = rng.uniform(-self.gain_jitter_db, self.gain_jitter_db)
    record = {**record, "gain_db": gain}
    clauses = len(record["keywords"])
    # Not in SCIO stage B (its recon_clauses index the full caption) nor for a one-clause caption.
    if "recon_clauses" not in record and clauses > 1 and rng.uniform() < self.clause_dropout:
      record = drop_clause(record, int(rng.integers(clauses)))
    if self.clause_negatives:  # from the (flipped, dropped) caption the positive pair shows
      caption, spans, _ = knowledge.clause_negative(record["scene_type"], record["field_names"],
                                                    record["keywords"], record["caption"], record["spans"], rng)
      record["negative"] = (caption, spans)
    return index, record


@dataclasses.dataclass
class _Features:
  """Record -> the model's numeric inputs."""

  codec: TextCodec
  db_mean: float
  db_std: float

  def __call__(self, item):
    index, record = item
    text = self.codec.encode(record["caption"], record["spans"])
    image = normalise(record["image"], self.db_mean - record.get("gain_db", 0.0), self.db_std)
    features = {"image": image, "text_ids": text.ids, "keyword_mask": text.keyword_mask,
                "clause_ids": text.clause_ids,
                "clause_fields": knowledge.field_slots(record["scene_type"], record["field_names"]),
                "index": np.int64(index), "valid": np.bool_(index >= 0)}
    if "negative" in record:
      features["neg_text_ids"] = self.codec.encode(*record["negative"]).ids
    if "recon_clauses" in record:
      caption, spans = record["caption"], record["spans"]
      for clause in sorted(record["recon_clauses"], reverse=True):  # the others keep their index
        caption, spans = remove_clause(caption, spans, clause)
      recon = self.codec.encode(caption, spans)
      features.update(recon_ids=recon.ids, recon_keyword_mask=recon.keyword_mask,
                      recon_clause_ids=recon.clause_ids)
    return features


def read_overlay(path: str) -> dict:
  """Caption overlay file (local or gs://) -> {example id: entry}."""
  return {entry["id"]: entry for entry in io.read_jsonl(path)}


def _check(options: PipelineOptions, process_count: int) -> None:
  if options.batch_size <= 0 or options.batch_size % process_count:
    raise ConfigError(f"batch_size={options.batch_size} must be a positive multiple of the "
                      f"process count ({process_count}).")
  if options.limit < 0:
    raise ConfigError(f"limit={options.limit} must be >= 0 (0: the whole split).")
  if options.worker_count < 0:
    raise ConfigError(f"worker_count={options.worker_count} must be >= 0.")
  if options.read_threads < 0:
    raise ConfigError(f"read_threads={options.read_threads} must be >= 0 (0: read in the calling thread).")
  if options.overlay_use not in ("", "recon", "caption") or bool(options.overlay) != bool(options.overlay_use):
    raise ConfigError(f"overlay={options.overlay!r} needs overlay_use 'recon' or 'caption', got "
                      f"{options.overlay_use!r}.")


def build(options: PipelineOptions, codec: TextCodec, *, process_index: int | None = None,
          process_count: int | None = None) -> grain.IterDataset:
  """The per-host pipeline of one split (process_* default to this JAX process)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  _check(options, process_count)
  stats = builder.metadata(options.data_dir)
  split = builder.open_split(options.data_dir, options.split)
  if options.limit > len(split):
    raise ConfigError(f"{options.limit} {options.split} examples asked (data.train_examples), but split "
                      f"{options.split!r} of {options.data_dir} has {len(split)}; lower it or use a larger dataset.")
  source = _IndexedSource(split, options.limit or len(split))
  ds = grain.MapDataset.source(source).seed(options.seed)
  if options.train:
    if len(source) < options.batch_size:
      raise ConfigError(f"split {options.split!r} has {len(source)} examples, fewer than one "
                        f"batch ({options.batch_size}); lower the batch size or add data.")
    ds = GlobalShuffle(ds, seed=options.seed, num_epochs=options.num_epochs)
  else:
    ds = PaddedToBatches(ds, options.batch_size)
  ds = ds.map(_Decode(read_overlay(options.overlay) if options.overlay else {}, options.overlay_use))
  if options.train:
    ds = ds.random_map(_Augment(options.flip, options.gain_jitter_db, options.clause_negatives,
                                options.clause_dropout))
  ds = ds.map(_Features(codec, stats["db_mean"], stats["db_std"]))
  ds = HostRows(ds, batch_size=options.batch_size, process_index=process_index, process_count=process_count)
  ds = ds.batch(options.batch_size // process_count, drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=options.read_threads,
                                            prefetch_buffer_size=options.prefetch_buffer))
  if options.worker_count:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; keep their defaults
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=options.worker_count))
  return it


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """`x` padded to `size` rows with copies of its first (so a jitted call sees one shape and
  compiles once; callers drop the padded rows' outputs)."""
  return np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)])


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh,
                 batch_axes: tuple[str, ...] = ("data", "fsdp")) -> dict:
  """Per-host numpy batch -> global jax.Arrays sharded over the mesh's batch axes."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
