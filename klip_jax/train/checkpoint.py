"""Checkpoints of a run: orbax saves of the train state next to the grain iterator state.

  WORKDIR/checkpoints/<step>/   state (sharded train state) + data (iterator position)
  WORKDIR/init_params/          parameters a fresh run starts from (`klip import-hf`)
  WORKDIR/caption_finetune/     params/ (a checkpoint's parameters after the caption fine-tune,
                                `klip finetune caption`) and finetune.json (what it was made from)
  WORKDIR/data_fingerprint.json  the tokenizer and dataset the checkpoints were trained on
Restoring reads arrays straight into the shardings of the current mesh, so a checkpoint
written on one mesh, or by another number of processes, resumes on another. Nothing here reads
or builds data. A gs:// workdir is handed to orbax as it is (orbax writes buckets itself: arrays
through tensorstore, metadata through etils.epath); only local paths are made absolute.
"""

from __future__ import annotations

import dataclasses
import json

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from klip_jax import config as config_lib
from klip_jax import io
from klip_jax.errors import CheckpointError, ConfigError, DatasetError, KlipError
from klip_jax.parallel import hosts
from klip_jax.train import state as state_lib

# Config sections a checkpoint's arrays depend on: changing them cannot resume.
_STATE_SECTIONS = ("model", "momentum")
# Settings outside those sections that shape the train state: gradient accumulation wraps the
# optimizer state (optax.MultiSteps).
_STATE_KEYS = ("optim.grad_accum",)


class IteratorHandler(grain.checkpoint.CheckpointHandler):
  """grain's iterator handler (one file per process), restoring onto another number of
  processes too: every host's iterator stands at the same global batch (`pipeline.HostRows`),
  so when this process has no file of its own, any host's file says where the stream is."""

  def restore(self, directory: epath.Path, item=None, args=None):
    item = item or args.item
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    saved = [own] if own.exists() else sorted(directory.glob("process_*-of-*.json"))
    if not saved:
      raise DatasetError(f"{directory} holds no data iterator position (process_*-of-*.json); "
                         "the checkpoint is incomplete: resume from an earlier step.")
    item.set_state(json.loads(saved[0].read_text()))
    item.start_prefetch()  # as grain's own restore does
    return item


@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  item: grain.DatasetIterator


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  item: grain.DatasetIterator


def manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      io.resolve(workdir) / "checkpoints",
      item_names=("state", "data"),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": IteratorHandler()},
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.train.keep, enable_async_checkpointing=True))


def save(checkpoints: ocp.CheckpointManager, step: int, state, iterator) -> None:
  """Save the state and the iterator position at `step` (asynchronously; orbax renames the
  finished step folder into place, so an interrupted save is never restored)."""
  checkpoints.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=IteratorSave(iterator)), force=True)


def sharded_target(abstract, shardings):
  """ShapeDtypeStructs that tell orbax where each restored array goes."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore_state(checkpoints: ocp.CheckpointManager, step: int, abstract, shardings, iterator=None):
  """The train state (sharded like `shardings`) and, if given, the iterator at `step`."""
  items = {"state": ocp.args.StandardRestore(sharded_target(abstract, shardings))}
  if iterator is not None:
    items["data"] = IteratorRestore(iterator)
  try:
    return checkpoints.restore(step, args=ocp.args.Composite(**items))["state"]
  except KlipError:
    raise
  except Exception as error:  # orbax and tensorstore raise bare Exceptions and ValueErrors for both
    folder = io.path(checkpoints.directory) / str(step)
    earlier = [s for s in sorted(checkpoints.all_steps()) if s < step]
    reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    raise CheckpointError(
        f"checkpoint {folder} cannot be restored ({reason}). If the run's config is the one it was "
        f"written with, the checkpoint is damaged: delete {folder} to resume from "
        f"{f'step {earlier[-1]}' if earlier else 'the start'}, or start afresh with a new --workdir.") from error


def init_params_path(workdir: str) -> str:
  """Where `klip import-hf` leaves the parameters a fresh run of `workdir` starts from."""
  return str(io.resolve(workdir) / "init_params")


def restore_params(path: str, abstract, shardings):
  """Parameters saved with orbax's StandardSave at `path`, sharded like `shardings`."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, sharded_target(abstract, shardings))


def caption_finetune_meta(workdir: str) -> dict | None:
  """What WORKDIR/caption_finetune was made from (source_step, steps, lr, metrics, ...), or None
  when there is no finished fine-tune (the JSON is written last, so it marks a complete one)."""
  path = io.resolve(workdir) / "caption_finetune" / "finetune.json"
  return io.read_json(path) if path.exists() else None


def save_caption_finetune(workdir: str, params, meta: dict) -> None:
  """Save fine-tuned parameters (all processes, as orbax does) and then their JSON record; an
  earlier fine-tune loses its record first, so an interrupted rebuild leaves none to trust."""
  folder = io.resolve(workdir) / "caption_finetune"
  if hosts.is_writer() and (folder / "finetune.json").exists():
    (folder / "finetune.json").unlink()
  hosts.sync("caption_finetune_unmarked")
  with ocp.StandardCheckpointer() as checkpointer:  # a temporary folder renamed into place
    checkpointer.save(folder / "params", params, force=True)
  io.write_json(folder / "finetune.json", meta)


def restore_caption_finetune(config: ml_collections.ConfigDict, workdir: str, vocab_size: int,
                             mesh: jax.sharding.Mesh):
  """The parameters `save_caption_finetune` left in `workdir`, sharded for `mesh`."""
  tx, _ = state_lib.make_optimizer(config.optim, config.train.steps)
  _, abstract, shardings = state_lib.abstract_state(config, vocab_size, tx, mesh)
  return restore_params(str(io.resolve(workdir) / "caption_finetune" / "params"), abstract.params,
                        shardings.params)


def latest_step(config: ml_collections.ConfigDict, workdir: str) -> int | None:
  """The step of a workdir's latest checkpoint (None: none yet), without restoring it."""
  with manager(workdir, config) as checkpoints:
    return checkpoints.latest_step()


def restore(config: ml_collections.ConfigDict, workdir: str, vocab_size: int, mesh: jax.sharding.Mesh,
            step: int | None = None):
  """(graphdef, train state) of a workdir's checkpoint (default: the latest)."""
  tx, _ = state_lib.make_optimizer(config.optim, config.train.steps)
  graph, abstract, shardings = state_lib.abstract_state(config, vocab_size, tx, mesh)
  checkpoints = manager(workdir, config)
  step = checkpoints.latest_step() if step is None else step
  if step is None or step not in checkpoints.all_steps():
    raise DatasetError(f"no checkpoint {'' if step is None else step} in {workdir}/checkpoints "
                       f"(have {sorted(checkpoints.all_steps())}); train first with klip train.")
  check_resumable(config, workdir)  # another model's checkpoint: named here, not inside orbax
  state = restore_state(checkpoints, step, abstract, shardings)
  checkpoints.close()
  return graph, state


def record_data(workdir: str, fingerprint: dict) -> None:
  """Record what a workdir's checkpoints are trained on (`data.prepare.fingerprint`)."""
  io.write_json(io.path(workdir) / "data_fingerprint.json", fingerprint)


# What each part of the fingerprint is set by, for the message that refuses a change.
_DATA_SETTINGS = {"tokenizer": "--config.data.tokenizer (empty: WORKDIR/tokenizer.model)",
                  "dataset": "--config.data.data_dir (empty: WORKDIR/data, built from data.synth)"}


def check_data(workdir: str, fingerprint: dict) -> None:
  """Refuse to continue a workdir's checkpoints on other data than they were trained on. Another
  tokenizer: with another piece count the restore fails deep inside orbax on the embedding's
  shape, with the same count every token id would silently mean another piece. Another
  dataset (a resume that dropped --config.data.data_dir trained on a fresh synthetic world
  without a word). Workdirs from before the record are not checked."""
  path = io.path(workdir) / "data_fingerprint.json"
  if not path.exists():
    return
  saved = io.read_json(path)
  changed = [part for part in _DATA_SETTINGS if saved.get(part) != fingerprint.get(part)]
  if changed:
    what = "; ".join(f"another {part} ({_describe(saved.get(part))} then, {_describe(fingerprint.get(part))} now), "
                     f"set by {_DATA_SETTINGS[part]}" for part in changed)
    raise ConfigError(f"{workdir}'s checkpoints were trained on other data: {what}. Give the run's own "
                      "data and tokenizer, or use a new --workdir.")


def _describe(part: dict | None) -> str:
  if not part:
    return "unrecorded"
  return ", ".join(f"{k} {str(v)[:12] + '...' if k == 'sha256' else v}" for k, v in part.items())


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuse to continue a workdir whose checkpoints belong to another model config (settings the
  saved config.json lacks, from before they existed, are not compared)."""
  path = io.path(workdir) / "config.json"
  if not path.exists():
    return
  saved = config_lib.flat(config_lib.read_saved(str(path)))
  now = config_lib.flat(json.loads(config.to_json_best_effort()))
  shapes_the_state = lambda name: name.split(".")[0] in _STATE_SECTIONS or name in _STATE_KEYS
  changed = [name for name in sorted(saved) if shapes_the_state(name) and saved[name] != now.get(name)]
  if changed:
    raise ConfigError(f"{workdir} holds checkpoints of a different model: {', '.join(changed)} "
                      "changed since they were written. Use a new --workdir, or the old values.")
