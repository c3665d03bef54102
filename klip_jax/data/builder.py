"""The TFDS builder that writes ArrayRecord shards, and opening what it wrote.

`KlipSar` is a `tfds.core.GeneratorBasedBuilder` run without TensorFlow. It writes into
`DATA_DIR/klip_sar/1.0.0/`; TFDS builds into an `incomplete.*` folder and renames it only
when every split is written, so an interrupted build never leaves a dataset that looks
complete. Every record is validated before it is written. The train split's dB statistics
(for input normalisation) and the build settings are stored in the dataset's metadata, so a
second build into the same folder with other settings is refused instead of silently reused.

A dataset lives on a local disk (or a mounted share), never on gs://: array_record's reader and
writer open the shards with POSIX open() (riegeli FdReader/FdWriter). Given a gs:// shard the
writer fails at its first record ("open() failed: No such file or directory") and the reader
(array-record 0.8.6) hangs, so `require_local` refuses an object-store data_dir up front.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from klip_jax import io
from klip_jax.data import knowledge, records, world
from klip_jax.errors import DatasetError

NAME = "klip_sar"
VERSION = "1.0.0"
SPLITS = ("train", "val", "test")


def to_db(amplitude: np.ndarray) -> np.ndarray:
  """Amplitude digital numbers -> dB (zero amplitudes, from quantisation, count as 1)."""
  return 20.0 * np.log10(np.maximum(amplitude.astype(np.float32), 1.0))


@dataclasses.dataclass(frozen=True)
class SynthSettings:
  """Everything that decides the bytes of a synthetic dataset."""

  num_examples: dict  # split -> count
  seed: int = 0
  noise_rate: float = 0.0
  world: world.WorldConfig = dataclasses.field(default_factory=world.WorldConfig)

  def as_metadata(self) -> dict:
    return {"num_examples": dict(self.num_examples), "seed": self.seed,
            "noise_rate": self.noise_rate, "world": dataclasses.asdict(self.world)}

  def validate(self) -> None:
    self.world.validate()
    if not 0 <= self.noise_rate <= 1:
      raise DatasetError(f"noise rate {self.noise_rate} is outside [0, 1].")
    if sum(self.num_examples.values()) <= 0 or min(self.num_examples.values()) < 0:
      raise DatasetError(f"split sizes {self.num_examples} must be >= 0 with at least one > 0.")

  def record(self, split: str, index: int) -> dict:
    return synth_record(self, split, index)


def synth_record(settings: SynthSettings, split: str, index: int) -> dict:
  """Record `index` of `split`: the chip and its (possibly noisy) knowledge text."""
  chip = world.make_chip(settings.seed, index, settings.world, split)
  rng = np.random.default_rng([settings.seed, index, sum(map(ord, split)), 1])
  return records.chip_record(chip, knowledge.describe(chip, rng, settings.noise_rate))


class RecordSource(Protocol):
  """Where a dataset's records come from: the synthetic world or an ingested manifest."""

  num_examples: dict

  def validate(self) -> None: ...

  def record(self, split: str, index: int) -> dict: ...

  def as_metadata(self) -> dict: ...


class KlipSar(tfds.core.GeneratorBasedBuilder):
  """SAR chips with HCoT captions: the embedded synthetic world or ingested records."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, settings: RecordSource, **kwargs):
    self._settings = settings
    self._db_sum = self._db_sq = self._db_count = 0.0
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=records.tfds_features(),
                                 metadata=tfds.core.MetadataDict(),
                                 description=__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n)
            for split, n in self._settings.num_examples.items() if n > 0}

  def _counts_for_stats(self, split: str) -> bool:
    """Input statistics come from the train split (from all splits if there is none)."""
    return split == "train" or "train" not in self._settings.num_examples

  def _generate_examples(self, split: str, num: int) -> Iterator[tuple[str, dict]]:
    for index in range(num):
      record = self._settings.record(split, index)
      records.validate_record(record)
      if self._counts_for_stats(split):
        db = to_db(record["image"])
        self._db_sum += float(db.sum())
        self._db_sq += float(np.square(db, dtype=np.float64).sum())
        self._db_count += db.size
      yield record["id"], records.to_example(record)
    if self._counts_for_stats(split) and self._db_count:
      mean = self._db_sum / self._db_count
      self.info.metadata["db_mean"] = mean
      self.info.metadata["db_std"] = float(np.sqrt(self._db_sq / self._db_count - mean**2))
    self.info.metadata["settings"] = self._settings.as_metadata()


def require_local(data_dir: str | os.PathLike) -> None:
  """Refuse a data_dir on an object store, naming the fix (see the module docstring)."""
  if io.is_remote(data_dir):
    raise DatasetError(
        f"the dataset {os.fspath(data_dir)} is on an object store, but ArrayRecord shards can only be "
        "read and written as local files. Copy it to a local disk on every host (gcloud storage cp -r "
        f"{os.fspath(data_dir)} /data/klip) or mount the bucket there (gcsfuse), and point "
        "--config.data.data_dir (or --data / --out) at that folder.")


def dataset_path(data_dir: str | os.PathLike) -> epath.Path:
  return epath.Path(data_dir) / NAME / VERSION


def build(data_dir: str | os.PathLike, settings: RecordSource) -> epath.Path:
  """Write a dataset into `data_dir` (reuses an identical finished build)."""
  require_local(data_dir)
  settings.validate()
  path = dataset_path(data_dir)
  if (path / "dataset_info.json").exists():
    existing = _open_builder(data_dir).info.metadata.get("settings")
    if existing != _jsonable(settings.as_metadata()):
      raise DatasetError(
          f"{path} already holds a dataset built with other settings ({existing}); "
          "choose another --out folder or delete that one.")
    return path
  KlipSar(settings=settings, data_dir=os.fspath(data_dir)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return path


def _jsonable(value):
  """What a value looks like after a JSON round trip (tuples become lists)."""
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def _open_builder(data_dir) -> tfds.core.DatasetBuilder:
  require_local(data_dir)
  path = dataset_path(data_dir)
  if not (path / "dataset_info.json").exists():
    parent = epath.Path(data_dir) / NAME
    partial = sorted(p.name for p in parent.glob("incomplete*")) if parent.exists() else []
    hint = (f" Only an interrupted build ({', '.join(partial)}) is there: delete it and rebuild."
            if partial else "")
    raise DatasetError(f"no finished klip dataset at {data_dir} (expected {path}).{hint} "
                       f"Create one with: klip data synth --out {data_dir}")
  return tfds.builder_from_directory(os.fspath(path))


def open_split(data_dir, split: str):
  """Random-access ArrayRecord source of one split (items are TFDS examples)."""
  builder = _open_builder(data_dir)
  if split not in builder.info.splits:
    raise DatasetError(f"{data_dir} has no split {split!r}; it has {sorted(builder.info.splits)}.")
  return builder.as_data_source(split=split)


def metadata(data_dir) -> dict:
  return dict(_open_builder(data_dir).info.metadata)
