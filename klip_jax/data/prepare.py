"""A run's dataset and tokenizer, from its config: made when training needs them, only located
when something restores a checkpoint.

`config.data.data_dir` names a dataset (the embedded world from `klip data synth`, or real
chips from `klip data ingest`); empty means the embedded world synthesised from
`config.data.synth` into WORKDIR/data. `config.data.tokenizer` names a sentencepiece model the
user trained (`klip data tokenizer`), which must exist: a mistyped path is an error, never a
fresh tokenizer trained there. Empty means WORKDIR/tokenizer.model, trained on the train
split's captions if absent.

The workdir and the tokenizer may be on gs://; the dataset may not (ArrayRecord shards are
local files, `builder.require_local`), so a gs:// workdir needs a local config.data.data_dir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import ml_collections

from klip_jax import io
from klip_jax.data import builder, records, tokenizer, world
from klip_jax.errors import ConfigError, DatasetError, TokenizerError
from klip_jax.parallel import hosts


@dataclasses.dataclass(frozen=True)
class RunData:
  """Where a run's examples are and how its text is encoded.

  `tokenizer` is the .model file the codec was read from, resolved from the config the way
  `ensure` and `locate` resolve it, so jobs that hand the run's tokenizer on to further runs
  (`klip ablate`'s arms) pass the same file rather than resolving it again; "" where a codec was
  made in memory (tests)."""

  data_dir: str
  codec: tokenizer.TextCodec
  tokenizer: str = ""


def synth_settings(synth: ml_collections.ConfigDict) -> builder.SynthSettings:
  """The builder settings of `config.data.synth`."""
  return builder.SynthSettings(
      num_examples={"train": synth.num_train, "val": synth.num_val, "test": synth.num_test},
      seed=synth.seed, noise_rate=synth.noise_rate,
      world=world.WorldConfig(image_size=synth.image_size, looks=synth.looks,
                              resolution_m=(synth.resolution_min, synth.resolution_max)))


def train_tokenizer(data_dir: str, vocab_size: int, out: str) -> tokenizer.TextCodec:
  """Train a sentencepiece model on the train split's captions and write it to `out`."""
  source = builder.open_split(data_dir, "train")
  captions = (records.from_example(source[i], decode_rasters=False)["caption"] for i in range(len(source)))
  tokenizer.train_sentencepiece(captions, vocab_size, out)
  return tokenizer.TextCodec(out, max_len=8)


def check_tokenizer(setting: str) -> None:
  """Refuse a `config.data.tokenizer` that names no file, before any work: a tokenizer the user
  named is one they trained, so training a new one at a mistyped path would hide the typo behind a
  run with another vocabulary."""
  if setting and not io.exists(setting):
    raise TokenizerError(f"--config.data.tokenizer={setting}: no such file. Give the .model file you "
                         f"trained with `{tokenizer.MAKE_ONE}`, or leave the setting empty to train "
                         "one into WORKDIR/tokenizer.model.")


def _paths(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
  if not config.data.data_dir and io.is_remote(workdir):
    raise DatasetError(f"the workdir {workdir} is on an object store, so the dataset cannot go into "
                       "WORKDIR/data (ArrayRecord shards are read as local files): give a local "
                       "--config.data.data_dir on every host (a local disk or a shared mount; build it "
                       "with klip data synth --out DIR, or copy an existing one there).")
  return (config.data.data_dir or str(io.path(workdir) / "data"),
          config.data.tokenizer or str(io.path(workdir) / "tokenizer.model"))


def ensure(config: ml_collections.ConfigDict, workdir: str) -> RunData:
  """The run's data, synthesising the embedded world and training the workdir's tokenizer if
  absent (process 0 makes them; the other processes wait, then read them). A tokenizer named in
  the config is only read (`check_tokenizer`)."""
  data_dir, tok_path = _paths(config, workdir)
  check_tokenizer(config.data.tokenizer)  # every process, so all of them stop, none waits in sync
  if hosts.is_writer():
    if not config.data.data_dir:
      builder.build(data_dir, synth_settings(config.data.synth))
    if not config.data.tokenizer and not io.exists(tok_path):
      train_tokenizer(data_dir, config.data.vocab_size, tok_path)
  hosts.sync("run data")
  return RunData(data_dir, tokenizer.TextCodec(tok_path, config.data.max_len), tok_path)


def check_chip_size(config: ml_collections.ConfigDict, data_dir: str) -> None:
  """Refuse a dataset whose chips are not the model's image size (the ViT's position
  embeddings fix it) where data meets the model (training, relabelling), before anything
  compiles; datasets built before sizes were recorded are not checked."""
  shape = builder.metadata(data_dir).get("image_shape")
  size = config.model.vision.image_size
  if shape and list(shape) != [size, size]:
    raise ConfigError(f"{data_dir} holds {shape[0]}x{shape[1]} chips but model.vision.image_size is "
                      f"{size}; set --config.model.vision.image_size={shape[0]} (a multiple of "
                      f"model.vision.patch_size={config.model.vision.patch_size}) or cut chips of "
                      f"{size} px with klip data tile --chip {size}")


def locate(config: ml_collections.ConfigDict, workdir: str) -> RunData:
  """The run's existing data; builds nothing (restoring a checkpoint must not synthesise a
  dataset or retrain a tokenizer behind the user's back)."""
  data_dir, tok_path = _paths(config, workdir)
  builder.require_local(data_dir)
  if not (builder.dataset_path(data_dir) / "dataset_info.json").exists():
    raise DatasetError(f"no dataset at {data_dir} for {workdir}; the run's data was moved or never "
                       "built. Point --config.data.data_dir at it, or train in this workdir first.")
  if not io.exists(tok_path):
    raise DatasetError(f"no tokenizer at {tok_path} for {workdir}; point --config.data.tokenizer at "
                       "the run's tokenizer.model, or train in this workdir first.")
  return RunData(data_dir, tokenizer.TextCodec(tok_path, config.data.max_len), tok_path)


def fingerprint(data: RunData) -> dict:
  """What identifies a run's data, wherever it lies: the tokenizer (its pieces' count and its
  model's sha256) and the dataset (the sha256 of the settings it was built from: the embedded
  world's, or an ingested manifest's with every image's and mask's sha256; the manifest's own
  path left out, so a moved dataset is the same one)."""
  settings = {k: v for k, v in builder.metadata(data.data_dir).get("settings", {}).items() if k != "manifest"}
  return {"tokenizer": {"pieces": int(data.codec.vocab_size),
                        "sha256": hashlib.sha256(data.codec.sp.serialized_model_proto()).hexdigest()},
          "dataset": {"sha256": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()}}
