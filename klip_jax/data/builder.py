"""The TFDS builder that writes ArrayRecord shards, and opening what it wrote.

`KlipSar` is a `tfds.core.GeneratorBasedBuilder` run without TensorFlow. A build writes
into a staging folder `DATA_DIR/klip_sar/.build-*` (TFDS itself writes an `incomplete.*`
folder inside it) and moves the finished `1.0.0/` into `DATA_DIR/klip_sar/` only when every
split is written, so an interrupted build never leaves a dataset that looks complete, and a
killed one (SIGKILL) leaves only a staging folder that the next build removes. Every record is
validated before it is written. The train split's dB statistics over valid pixels (for input
normalisation), the chip shape and the build settings (for ingested data: the manifest's and
every image's sha256) are stored in the dataset's metadata, so a second build into the same
folder with other settings or changed images is refused, naming what changed, instead of
silently reused; `rebuild=True` replaces it (the old dataset stays until the new one is done).
One build per folder at a time.

Shards are read through `open_split`, which names the shard file when a read fails (a
truncated or corrupted ArrayRecord file).

A dataset lives on a local disk (or a mounted share), never on gs://: array_record's reader and
writer open the shards with POSIX open() (riegeli FdReader/FdWriter). Given a gs:// shard the
writer fails at its first record ("open() failed: No such file or directory") and the reader
(array-record 0.8.6) hangs, so `require_local` refuses an object-store data_dir up front.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import resource
import struct
import uuid
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import shuffle as tfds_shuffle

from klip_jax import io
from klip_jax.data import knowledge, records, world
from klip_jax.errors import DatasetError

NAME = "klip_sar"
VERSION = "1.0.0"
SPLITS = ("train", "val", "test")


# Float amplitude (calibrated data) is floored here: far below any backscatter a SAR measures,
# so only exact zeros (e.g. negative intensities after noise subtraction) reach it.
FLOAT_FLOOR_DB = -100.0


def to_db(amplitude: np.ndarray) -> np.ndarray:
  """Amplitude -> dB, float32. Integer digital numbers: zeros (quantisation) count as 1, as
  ever. Float amplitude: floored at FLOAT_FLOOR_DB; NaN (no data) stays NaN."""
  floor = 1.0 if np.issubdtype(amplitude.dtype, np.integer) else 10.0 ** (FLOAT_FLOOR_DB / 20.0)
  return 20.0 * np.log10(np.maximum(amplitude.astype(np.float32), np.float32(floor)))


@dataclasses.dataclass(frozen=True)
class SynthSettings:
  """Everything that decides the bytes of a synthetic dataset."""

  num_examples: dict  # split -> count
  seed: int = 0
  noise_rate: float = 0.0
  world: world.WorldConfig = dataclasses.field(default_factory=world.WorldConfig)

  def as_metadata(self) -> dict:
    return {"num_examples": dict(self.num_examples), "seed": self.seed,
            "noise_rate": self.noise_rate, "world": dataclasses.asdict(self.world),
            "generator": world.GENERATOR_VERSION}

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


class _LocalInfo(tfds.core.DatasetInfo):
  """TFDS's DatasetInfo, without the look-up of a builder's precomputed info on TFDS's GCS
  bucket, which klip_sar is never on: TFDS makes a temp folder for it whenever a builder
  starts before its dataset exists and never removes it (one empty /tmp/tmp*tfds per build)."""

  def initialize_from_bucket(self) -> None:
    pass


class KlipSar(tfds.core.GeneratorBasedBuilder):
  """SAR chips with HCoT captions: the embedded synthetic world or ingested records."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, settings: RecordSource, **kwargs):
    self._settings = settings
    self._db_sum = self._db_sq = self._db_count = 0.0
    self._shapes = set()
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalInfo(builder=self, features=records.tfds_features(), metadata=tfds.core.MetadataDict(),
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
        self._count_db(record["image"])
      self._shapes.add(record["image"].shape)
      yield record["id"], records.to_example(record)
    if self._counts_for_stats(split) and self._db_count:
      mean = self._db_sum / self._db_count
      self.info.metadata["db_mean"] = mean
      self.info.metadata["db_std"] = float(np.sqrt(self._db_sq / self._db_count - mean**2))
    if len(self._shapes) == 1:
      self.info.metadata["image_shape"] = list(next(iter(self._shapes)))
    self.info.metadata["settings"] = self._settings.as_metadata()

  def _count_db(self, image: np.ndarray) -> None:
    db = to_db(image)
    if not np.issubdtype(image.dtype, np.integer):  # float amplitude: no-data (NaN) counts in no statistic
      db = db[np.isfinite(db)].astype(np.float64)
    self._db_sum += float(db.sum())
    self._db_sq += float(np.square(db, dtype=np.float64).sum())
    self._db_count += db.size


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


def build(data_dir: str | os.PathLike, settings: RecordSource, rebuild: bool = False) -> epath.Path:
  """Write a dataset into `data_dir` (reuses an identical finished build unless `rebuild`)."""
  require_local(data_dir)
  _require_folder(data_dir)
  settings.validate()
  path = dataset_path(data_dir)
  wanted = _jsonable(settings.as_metadata())
  if (path / "dataset_info.json").exists():
    try:
      existing = _open_builder(data_dir).info.metadata.get("settings")
    except DatasetError:  # a damaged dataset: what `rebuild` is for
      if not rebuild:
        raise
      existing = None
    if existing == wanted and not rebuild:
      return path
    if not rebuild:
      describe = getattr(settings, "describe_change", None)
      raise DatasetError((describe(existing, data_dir) if describe else None) or (
          f"{path} already holds a dataset built with other settings ({existing}); "
          "choose another --out folder, or replace it: "
          f"{command(wanted, data_dir, '--rebuild')}."))
  parent = epath.Path(data_dir) / NAME
  _remove_leftovers(parent)
  staging = parent / f".build-{uuid.uuid4().hex[:8]}"
  staging.mkdir(parents=True)
  try:
    (staging / "settings.json").write_text(json.dumps(wanted))  # names the command after a kill
    with _spills_without_tensorflow():
      KlipSar(settings=settings, data_dir=os.fspath(staging)).download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    io.replace(staging / NAME / VERSION, path)
  finally:
    if staging.exists():
      staging.rmtree()
  return path


def _require_folder(data_dir: str | os.PathLike) -> None:
  """Refuse a data_dir that is a file, or lies under one, before a build reads any chip (the
  first folder it made would fail with a raw NotADirectoryError)."""
  path = os.path.abspath(os.fspath(data_dir))
  while not os.path.lexists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    where = "" if path == os.path.abspath(os.fspath(data_dir)) else f" (it lies under the file {path})"
    raise DatasetError(f"the dataset folder {os.fspath(data_dir)} is not a folder{where}; --out must be a folder "
                       "(new or existing): give another path.")


class _LocalBucket(tfds_shuffle._Bucket):
  """TFDS's shuffle bucket (the same file format) written and read with Python's open()
  instead of tf.io.gfile. TFDS shuffles a split's serialized records in memory up to
  `shuffle.MAX_MEM_BUFFER_SIZE` (1 GB) and spills the rest into 1,000 bucket files in the
  build's staging folder, which `require_local` keeps on a local disk; through tf.io.gfile
  that needs TensorFlow, which klip_jax does not install (a 224 px world of 20,000 chips,
  ~2.4 GB, failed with "No module named 'tensorflow'" after 9 minutes of generation). A build
  therefore needs twice the split's size on disk for a moment, and holds at most 1 GB of it in
  memory."""

  def add(self, key, data: bytes) -> None:
    if not self._fobj:
      os.makedirs(os.path.dirname(self._path), exist_ok=True)
      self._fobj = _open_bucket(self._path)
    self._fobj.write(tfds_shuffle._hkey_to_bytes(key))
    self._fobj.write(struct.pack("=Q", len(data)))  # the layout _Bucket documents and reads
    self._fobj.write(data)
    self._length += 1
    self._size += len(data)

  def flush(self) -> None:
    if self._fobj:
      self._fobj.close()

  def read_values(self):
    self.flush()
    if not os.path.exists(self._path):  # a bucket no key hashed into
      return
    with open(self._path, "rb") as f:
      while key := f.read(tfds_shuffle.HKEY_SIZE_BYTES):
        (size,) = struct.unpack("=Q", f.read(8))
        yield tfds_shuffle._read_hkey(key), f.read(size)

  def del_file(self) -> None:
    with contextlib.suppress(FileNotFoundError):
      os.remove(self._path)


def _open_bucket(path):
  """A bucket file for writing, or a DatasetError when the process may not open one more."""
  try:
    return open(path, "wb")
  except OSError as e:
    if e.errno != errno.EMFILE:
      raise
    raise DatasetError(f"a dataset build spills a large split into {tfds_shuffle.BUCKETS_NUMBER} files open at "
                       f"once, but this process may open no more files ({e}): raise the open-file limit "
                       f"(ulimit -n {_OPEN_FILES}) and build again.") from e


_OPEN_FILES = 2 * tfds_shuffle.BUCKETS_NUMBER  # the buckets, the shards and whatever else is open


@contextlib.contextmanager
def _spills_without_tensorflow():
  """While a build runs, TFDS's shuffler writes its spill buckets as `_LocalBucket`s, and the
  process's soft open-file limit is at least _OPEN_FILES (up to the hard limit): a split that
  spills keeps all its bucket files open at once."""
  default = tfds_shuffle._Bucket
  limits = resource.getrlimit(resource.RLIMIT_NOFILE)
  soft, hard = limits
  if soft != resource.RLIM_INFINITY and soft < _OPEN_FILES:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_OPEN_FILES if hard == resource.RLIM_INFINITY
                                                else min(_OPEN_FILES, hard), hard))
  tfds_shuffle._Bucket = _LocalBucket
  try:
    yield
  finally:
    tfds_shuffle._Bucket = default
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def command(settings: dict | None, data_dir, flags: str = "") -> str:
  """The command that builds a dataset with these settings (for hints)."""
  flags = f" {flags}" if flags else ""
  if settings and "manifest" in settings:
    return f"klip data ingest --manifest {settings['manifest']} --out {data_dir}{flags}"
  return (f"klip data synth --out {data_dir}{flags} with the run's --config (klip train and klip "
          "pretrain rebuild their own WORKDIR/data)")


def _leftovers(parent: epath.Path) -> list[epath.Path]:
  """What interrupted builds left: staging folders (a SIGKILL), TFDS `incomplete.*` folders
  (builds before staging) and a replaced dataset not yet deleted."""
  if not parent.exists():
    return []
  return sorted(p for pattern in (".build-*", "incomplete*", ".*.old-*") for p in parent.glob(pattern))


def _remove_leftovers(parent: epath.Path) -> None:
  for leftover in _leftovers(parent):
    leftover.rmtree()


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
    leftovers = _leftovers(epath.Path(data_dir) / NAME)
    if leftovers:
      started = [p / "settings.json" for p in leftovers if (p / "settings.json").exists()]
      settings = json.loads(started[0].read_text()) if started else None
      raise DatasetError(
          f"no finished klip dataset at {data_dir}: only an interrupted build ({leftovers[0].name}) is "
          f"there. Run the build again (it removes the leftover first): {command(settings, data_dir)}")
    raise DatasetError(
        f"no finished klip dataset at {data_dir} (expected {path}). Create one with: klip data synth "
        f"--out {data_dir} (the synthetic world) or klip data ingest --manifest M --out {data_dir} (your chips)")
  try:
    return tfds.builder_from_directory(os.fspath(path))
  except Exception as e:  # protobuf ParseError, JSONDecodeError, ValueError of an empty or damaged file
    problem = " ".join(str(e).split())[:200] or type(e).__name__
    raise DatasetError(f"the dataset at {data_dir} cannot be opened: its dataset_info.json, features.json or "
                       f"metadata.json in {path} is empty or damaged ({type(e).__name__}: {problem}); rebuild "
                       f"it: {_rebuild_command(path, data_dir)}") from None


def _rebuild_command(path: epath.Path, data_dir) -> str:
  """The command that rebuilds a damaged dataset: from the settings in its metadata.json when
  that file still reads, else both commands (which one built it is unknown)."""
  try:
    settings = json.loads((path / "metadata.json").read_text())["settings"]
  except Exception:  # the metadata is damaged too
    return (f"klip data ingest --manifest M --out {data_dir} --rebuild (ingested chips), or "
            f"{command(None, data_dir, '--rebuild')}")
  return command(settings, data_dir, "--rebuild")


class _NamedShards:
  """A split's random-access source whose read errors name the ArrayRecord shard that failed
  (a truncated or corrupted file) and the command that rebuilds it."""

  def __init__(self, source, files: list, lengths: list[int], fix: str):
    self._source, self._files, self._fix = source, [os.fspath(f) for f in files], fix
    self._ends = np.cumsum(lengths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    try:
      example = self._source[index]
      if example is None:
        raise ValueError("no record")
      return example
    except Exception as e:  # riegeli/array_record/TFDS decode errors of a damaged file
      shard = self._files[min(int(np.searchsorted(self._ends, index, side="right")), len(self._files) - 1)]
      problem = " ".join(str(e).split())[:200]
      raise DatasetError(f"shard {shard} is truncated or corrupted (reading example {index}: {problem}); "
                         f"rebuild the dataset: {self._fix}") from None

  def __getitems__(self, indices):
    return [self[i] for i in indices]


def require_split(data_dir, split: str, needed_by: str) -> None:
  """Refuse, before the work that leads up to it, a dataset without `split`, which `needed_by`
  (a sentence: who reads it and how to do without) would only find missing hours later."""
  try:
    open_split(data_dir, split)
  except DatasetError as error:
    raise DatasetError(f"{error} {needed_by}") from None


def open_split(data_dir, split: str):
  """Random-access ArrayRecord source of one split (items are TFDS examples)."""
  builder = _open_builder(data_dir)
  if split not in builder.info.splits:
    raise DatasetError(f"{data_dir} has no split {split!r}; it has {sorted(builder.info.splits)}.")
  info = builder.info.splits[split]
  fix = command(builder.info.metadata.get("settings"), data_dir, "--rebuild")
  return _NamedShards(builder.as_data_source(split=split), info.filepaths, info.shard_lengths, fix)


def metadata(data_dir) -> dict:
  return dict(_open_builder(data_dir).info.metadata)
