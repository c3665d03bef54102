"""The training driver behind `klip train`: data, tokenizer, sharded state, checkpoints, logs.

Everything a run writes lives under its workdir:
  data/                 the embedded synthetic world (when config.data.data_dir is empty)
  tokenizer.model       sentencepiece model (when config.data.tokenizer is empty)
  checkpoints/<step>/   orbax checkpoints: the train state AND the grain iterator state
  logs/                 TensorBoard event files
  metrics.jsonl         one JSON line per logged step
  init_params/          parameters a fresh run starts from instead of a random init (written by
                        `klip import-hf`; ignored once a checkpoint exists)
A second invocation on the same workdir resumes from the latest checkpoint; with the same
config and seed the result equals an uninterrupted run (the per-step RNG is folded from the
seed and the step, and the data iterator is restored exactly).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter
from tqdm import tqdm

from klip_jax import config as config_lib
from klip_jax.data import builder, pipeline, records, tokenizer, world
from klip_jax.errors import ConfigError, DatasetError
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import relabel as relabel_lib
from klip_jax.train import scio
from klip_jax.train import state as state_lib
from klip_jax.train import step as step_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
  """What a training run is built from (shared by train, relabel and eval)."""

  config: ml_collections.ConfigDict
  workdir: str
  data_dir: str
  codec: tokenizer.TextCodec
  mesh: jax.sharding.Mesh


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, tokenizer.TextCodec]:
  """The dataset folder and text codec of a run, synthesising / training them if absent."""
  data_dir = config.data.data_dir or os.path.join(workdir, "data")
  if not config.data.data_dir:
    s = config.data.synth
    settings = builder.SynthSettings(
        num_examples={"train": s.num_train, "val": s.num_val, "test": s.num_test},
        seed=s.seed, noise_rate=s.noise_rate,
        world=world.WorldConfig(image_size=s.image_size,
                                resolution_m=(s.resolution_min, s.resolution_max)))
    builder.build(data_dir, settings)
  tok_path = config.data.tokenizer or os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(tok_path):
    source = builder.open_split(data_dir, "train")
    captions = (records.from_example(source[i], decode_rasters=False)["caption"] for i in range(len(source)))
    tokenizer.train_sentencepiece(captions, config.data.vocab_size, tok_path)
  return data_dir, tokenizer.TextCodec(tok_path, config.data.max_len)


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  data_dir, codec = prepare_data(config, workdir)
  return Run(config, workdir, data_dir, codec, mesh_lib.make_mesh(config.mesh.shape))


def train_pipeline(run: Run, overlay: str = "", overlay_use: str = "") -> grain.IterDataset:
  c = run.config
  return pipeline.build(pipeline.PipelineOptions(
      run.data_dir, "train", c.train.batch_size, seed=c.seed, worker_count=c.data.worker_count,
      flip=c.data.flip, gain_jitter_db=c.data.gain_jitter_db, overlay=overlay,
      overlay_use=overlay_use), run.codec)


# Offline SCIO: the caption round each stage reads, and how.
_STAGE_OVERLAY = {"B": (1, "recon"), "C": (2, "caption")}


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      item_names=("state", "data"),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()},
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.train.keep, enable_async_checkpointing=True))


def _sharded_target(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore_state(manager: ocp.CheckpointManager, step: int, abstract, shardings, iterator=None):
  """The train state (sharded like `shardings`) and, if given, the iterator at `step`."""
  items = {"state": ocp.args.StandardRestore(_sharded_target(abstract, shardings))}
  if iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(iterator)
  return manager.restore(step, args=ocp.args.Composite(**items))["state"]


def init_params_path(workdir: str) -> str:
  """Where `klip import-hf` leaves the parameters a fresh run of `workdir` starts from."""
  return os.path.join(os.path.abspath(workdir), "init_params")


def restore_params(path: str, abstract, shardings):
  """Parameters saved with orbax's StandardSave at `path`, sharded like `shardings`."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, _sharded_target(abstract, shardings))


def _log_metrics(writer: SummaryWriter, path: str, step: int, metrics: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps({"step": step, **metrics}) + "\n")
  for name, value in metrics.items():
    writer.add_scalar(f"train/{name}", value, step)
  writer.flush()


def restore(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """(run, graphdef, train state) of a workdir's checkpoint (default: the latest)."""
  run = setup(config, workdir)
  tx, _ = state_lib.make_optimizer(config.optim, config.train.steps)
  graph, abstract, shardings = state_lib.abstract_state(config, run.codec.vocab_size, tx, run.mesh)
  manager = checkpoint_manager(workdir, config)
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise DatasetError(f"no checkpoint {'' if step is None else step} in {workdir}/checkpoints "
                       f"(have {sorted(manager.all_steps())}); train first with klip train.")
  state = restore_state(manager, step, abstract, shardings)
  manager.close()
  return run, graph, state


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None,
          progress: bool = True) -> dict:
  """Train (or resume) to config.train.steps; returns the last logged metrics.

  With SCIO stage lengths in config.scio, steps run stage A, then B, then C (online: each
  batch is relabelled right before its step; offline: the whole train split is relabelled at
  each stage boundary into a caption overlay the pipeline reads from then on).
  `stop_at` ends this invocation early (checkpointed) at that step, as a preempted or
  time-sliced job would; running again continues exactly.
  """
  run = setup(config, workdir)
  c = run.config
  scio_on = scio.total_steps(c.scio) > 0
  if scio_on:
    scio.validate(c)
  tx, schedule = state_lib.make_optimizer(c.optim, c.train.steps)
  vocab = run.codec.vocab_size
  graph, abstract, shardings = state_lib.abstract_state(c, vocab, tx, run.mesh)
  manager = checkpoint_manager(workdir, c)
  start = manager.latest_step() or 0
  imported = not start and os.path.isdir(init_params_path(workdir))
  if start or imported:
    _check_resumable(c, workdir)
  write_atomic(os.path.join(workdir, "config.json"), c.to_json_best_effort(indent=2))
  stage = scio.stage_of(start, c.scio) if scio_on else "A"
  iterator = iter(_stage_pipeline(run, stage))
  if start:
    state = restore_state(manager, start, abstract, shardings, iterator)
    log.info("resumed from step %d", start)
  else:
    _, state, _ = state_lib.create(c, vocab, tx, run.mesh)
    if imported:
      params = restore_params(init_params_path(workdir), abstract.params, shardings.params)
      momentum = None if state.momentum_params is None else jax.tree.map(
          lambda x: x.copy(), state_lib.momentum_subset(params))
      state = state.replace(params=params, momentum_params=momentum)
      log.info("starting from the parameters in %s", init_params_path(workdir))
  tokens = step_lib.TokenIds.from_codec(run.codec)
  writer = SummaryWriter(os.path.join(workdir, "logs"))
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  base_rng = jax.random.key(c.seed)
  last: dict = {}
  with mesh_lib.logical_context(run.mesh, c.mesh.rules):
    steps = {"A": step_lib.make_train_step(c, graph, tx, schedule, tokens, shardings, run.mesh)}
    if scio_on:
      config_c = c.copy_and_resolve_references()
      config_c.loss.extra_mask_rate = c.scio.stage_c_extra_mask_rate
      steps["B"] = steps["A"]
      steps["C"] = step_lib.make_train_step(config_c, graph, tx, schedule, tokens, shardings, run.mesh)
      relabel_fns = {name: relabel_lib.make_relabel_step(c, graph, tokens, shardings.params, run.mesh,
                                                         proofread=name == "C") for name in ("B", "C")}
    if scio_on and c.scio.mode == "offline" and stage in _STAGE_OVERLAY:
      iterator = _enter_offline_stage(run, stage, relabel_fns[stage], state.params, iterator)
    bar = tqdm(total=c.train.steps, initial=start, disable=not progress, desc="train", unit="step")
    tick, tick_step = time.perf_counter(), start
    end = c.train.steps if stop_at is None else min(stop_at, c.train.steps)
    for step in range(start, end):
      if scio_on and scio.stage_of(step, c.scio) != stage:
        stage = scio.stage_of(step, c.scio)
        if c.scio.mode == "offline":
          iterator = _enter_offline_stage(run, stage, relabel_fns[stage], state.params, iterator)
      local = next(iterator)
      batch = pipeline.global_batch({k: np.asarray(local[k]) for k in local
                                     if k in step_lib.MODEL_INPUTS or k.startswith("recon_")}, run.mesh)
      if scio_on and stage in ("B", "C") and c.scio.mode == "online":
        result = relabel_fns[stage](state.params, step_lib.model_inputs(batch),
                                    jax.random.fold_in(base_rng, step))
        if stage == "B":
          batch.update(recon_ids=result.removed_ids, recon_keyword_mask=result.removed_keyword_mask,
                       recon_clause_ids=result.removed_clause_ids)
        else:
          batch["text_ids"] = result.corrected_ids
      state, metrics = steps[stage](state, batch, jax.random.fold_in(base_rng, step))
      done = step + 1
      if done % c.train.log_every == 0 or done == end:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        last["images_per_s"] = (done - tick_step) * c.train.batch_size / (now - tick)
        last["stage"] = "ABC".index(stage)
        tick, tick_step = now, done
        _log_metrics(writer, metrics_path, done, last)
        bar.set_postfix(stage=stage, loss=f"{last['loss']:.3f}", img_s=f"{last['images_per_s']:.1f}")
      if done % c.train.ckpt_every == 0 or done == end:
        manager.save(done, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)),
            force=True)
      bar.update(1)
    bar.close()
  manager.wait_until_finished()
  manager.close()
  writer.close()
  return last


# Config sections a checkpoint's arrays depend on: changing them cannot resume.
_STATE_SECTIONS = ("model", "momentum")


def _check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  now = json.loads(config.to_json_best_effort())
  changed = [f"{section}.{key}" for section in _STATE_SECTIONS
             for key in sorted(set(saved.get(section, {})) | set(now.get(section, {})))
             if saved.get(section, {}).get(key) != now.get(section, {}).get(key)]
  if changed:
    raise ConfigError(f"{workdir} holds checkpoints of a different model: {', '.join(changed)} "
                      "changed since they were written. Use a new --workdir, or the old values.")


def write_atomic(path: str, text: str) -> None:
  """Write a text file so a crash leaves the old file or the new one, never half of one."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _stage_pipeline(run: Run, stage: str) -> grain.IterDataset:
  """The train pipeline of a stage (offline SCIO stages read their caption overlay)."""
  if run.config.scio.mode == "offline" and stage in _STAGE_OVERLAY:
    round_index, use = _STAGE_OVERLAY[stage]
    path = scio.overlay_path(run.workdir, round_index)
    if os.path.exists(path):
      return train_pipeline(run, path, use)
  return train_pipeline(run)


def _enter_offline_stage(run: Run, stage: str, relabel, params, iterator):
  """Write the stage's caption round unless an earlier (interrupted) run did, and continue the
  data iterator, from where it stands, on the pipeline that reads that round."""
  round_index, _ = _STAGE_OVERLAY[stage]
  if not os.path.exists(scio.overlay_path(run.workdir, round_index)):
    entries = scio.relabel_split(relabel, params, run.data_dir, "train", run.codec, run.mesh,
                                 run.config.scio.relabel_batch_size)
    scio.write_overlay(run.workdir, round_index, entries)
  position = iterator.get_state()
  iterator = iter(_stage_pipeline(run, stage))
  iterator.set_state(position)
  return iterator

