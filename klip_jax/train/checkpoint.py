"""Checkpoints of a run: orbax saves of the train state next to the grain iterator state.

  WORKDIR/checkpoints/<step>/   state (sharded train state) + data (iterator position)
  WORKDIR/init_params/          parameters a fresh run starts from (`klip import-hf`)
  WORKDIR/caption_finetune/     params/ (a checkpoint's parameters after the caption fine-tune,
                                `klip finetune caption`) and finetune.json (what it was made from)
  WORKDIR/tokenizer_fingerprint.json  the tokenizer the checkpoints were trained with (sha256, pieces)
Restoring reads arrays straight into the shardings of the current mesh, so a checkpoint
written on one mesh, or by another number of processes, resumes on another. Nothing here reads
or builds data. A gs:// workdir is handed to orbax as it is (orbax writes buckets itself: arrays
through tensorstore, metadata through etils.epath); only local paths are made absolute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from klip_jax import io
from klip_jax.errors import ConfigError, DatasetError
from klip_jax.parallel import hosts
from klip_jax.train import state as state_lib

# Config sections a checkpoint's arrays depend on: changing them cannot resume.
_STATE_SECTIONS = ("model", "momentum")


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
  return checkpoints.restore(step, args=ocp.args.Composite(**items))["state"]


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
  state = restore_state(checkpoints, step, abstract, shardings)
  checkpoints.close()
  return graph, state


def tokenizer_fingerprint(codec) -> dict:
  """What identifies a tokenizer (`data.tokenizer.TextCodec`): its pieces' count and its model's sha256."""
  return {"pieces": int(codec.vocab_size), "sha256": hashlib.sha256(codec.sp.serialized_model_proto()).hexdigest()}


def record_tokenizer(workdir: str, codec) -> None:
  """Record the tokenizer a workdir's checkpoints are trained with (`check_tokenizer` reads it)."""
  io.write_json(io.path(workdir) / "tokenizer_fingerprint.json", tokenizer_fingerprint(codec))


def check_tokenizer(workdir: str, codec) -> None:
  """Refuse to continue a workdir's checkpoints with another tokenizer than they were trained
  with: with another piece count the restore fails deep inside orbax on the embedding's shape;
  with the same count it would go on silently, every token id meaning another piece. Workdirs
  from before the record are not checked."""
  path = io.path(workdir) / "tokenizer_fingerprint.json"
  if not path.exists():
    return
  saved, now = io.read_json(path), tokenizer_fingerprint(codec)
  if saved != now:
    raise ConfigError(
        f"{workdir}'s checkpoints were trained with another tokenizer ({saved['pieces']} pieces, sha256 "
        f"{saved['sha256'][:12]}...) than data.tokenizer gives now ({now['pieces']} pieces, sha256 "
        f"{now['sha256'][:12]}...). Point --config.data.tokenizer at the run's own tokenizer (empty: "
        f"WORKDIR/tokenizer.model), or use a new --workdir.")


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuse to continue a workdir whose checkpoints belong to another model config."""
  path = io.path(workdir) / "config.json"
  if not path.exists():
    return
  saved = io.read_json(path)
  now = json.loads(config.to_json_best_effort())
  changed = [f"{section}.{key}" for section in _STATE_SECTIONS
             for key in sorted(set(saved.get(section, {})) | set(now.get(section, {})))
             if saved.get(section, {}).get(key) != now.get(section, {}).get(key)]
  if changed:
    raise ConfigError(f"{workdir} holds checkpoints of a different model: {', '.join(changed)} "
                      "changed since they were written. Use a new --workdir, or the old values.")
