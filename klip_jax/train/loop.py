"""The training loop behind `klip train` and `klip pretrain`: sharded state, steps, SCIO stages,
checkpoints, logs, and evaluation hooks.

The loop is handed its data (`data.prepare`), so it knows datasets only as folders and a codec;
it writes under the workdir:
  config.json           the config it ran with
  checkpoints/<step>/   the train state AND the grain iterator state (`train.checkpoint`)
  logs/, metrics.jsonl  TensorBoard and JSON lines (`train.metrics_writer`)
A second invocation on the same workdir resumes from the latest checkpoint; with the same
config and seed the result equals an uninterrupted run (the per-step RNG is folded from the
seed and the step, and the data iterator is restored exactly).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from klip_jax import compilations, io
from klip_jax import config as config_lib
from klip_jax.data import pipeline, prepare
from klip_jax.data.prepare import RunData
from klip_jax.data.tokenizer import TokenIds
from klip_jax.errors import Preempted
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import checkpoint, preemption, scio
from klip_jax.train import state as state_lib
from klip_jax.train import step as step_lib
from klip_jax.train.metrics_writer import MetricsWriter

log = logging.getLogger(__name__)

# evaluate(step, graphdef, params) -> {task: {metric: value}}: what the caller wants measured
# while the model trains (the jobs layer passes the configured cheap evaluators, eval.periodic).
EvalHook = Callable[[int, nnx.GraphDef, nnx.State], dict]


def train(config: ml_collections.ConfigDict, workdir: str, data: RunData, *,
          stop_at: int | None = None, progress: bool = True, evaluate: EvalHook | None = None) -> dict:
  """Train (or resume) to config.train.steps; returns the last logged metrics.

  With SCIO stage lengths in config.scio, steps run stage A, then B, then C (online: each
  batch is relabelled right before its step; offline: the whole train split is relabelled at
  each stage boundary into a caption overlay the pipeline reads from then on).
  `evaluate` runs every config.eval.every steps (when > 0) and at config.eval.at_steps, and its
  results are logged.
  `stop_at` ends this invocation early (checkpointed) at that step, as a time-sliced job
  would; a SIGTERM does the same at the next step boundary and raises `Preempted`
  (`train.preemption`). Running again continues exactly.
  """
  c = config
  config_lib.validate(c)
  scio_on = scio.total_steps(c.scio) > 0
  if scio_on:
    scio.validate(c)
  io.path(workdir).mkdir(parents=True, exist_ok=True)
  mesh = mesh_lib.from_config(c.mesh)
  mesh_lib.check_batch(c.train.batch_size, mesh.devices.shape, "config.train.batch_size")
  tx, schedule = state_lib.make_optimizer(c.optim, c.train.steps)
  graph, abstract, shardings = state_lib.abstract_state(c, data.codec.vocab_size, tx, mesh)
  checkpoints = checkpoint.manager(workdir, c)
  start = checkpoints.latest_step() or 0
  imported = not start and io.path(checkpoint.init_params_path(workdir)).is_dir()
  inputs = prepare.fingerprint(data)
  if start:
    checkpoint.check_data(workdir, inputs)
  if start or imported:
    checkpoint.check_resumable(c, workdir)
  stage = scio.stage_of(start, c.scio) if scio_on else "A"
  iterator = iter(scio.stage_pipeline(c, data, workdir, stage))
  if start:
    state = checkpoint.restore_state(checkpoints, start, abstract, shardings, iterator)
    log.info("resumed from step %d", start)
  else:
    state = _initial_state(c, data, tx, mesh, workdir, abstract, shardings, imported)
  # Written once the state is in hand: a resume that fails leaves the run's records as they were.
  io.write_text(io.path(workdir) / "config.json", c.to_json_best_effort(indent=2))
  checkpoint.record_data(workdir, inputs)
  tokens = TokenIds.from_codec(data.codec)
  writer = MetricsWriter(workdir, start)
  base_rng = jax.random.key(c.seed)
  last: dict = {}
  with mesh_lib.logical_context(mesh, c.mesh.rules), compilations.Counter() as compiled:
    # One program for every stage: SCIO's batches carry what differs (`scio.reconstruction_inputs`).
    train_step = step_lib.make_train_step(c, graph, tx, schedule, tokens, shardings, mesh)
    if scio_on:
      relabel_fns = scio.relabel_steps(c, graph, tokens, shardings.params, mesh, data)
    if scio_on and c.scio.mode == "offline" and stage in scio.STAGE_OVERLAY:
      iterator = scio.enter_offline_stage(c, data, workdir, stage, relabel_fns[stage], state.params,
                                          iterator, mesh)
    bar = tqdm(total=c.train.steps, initial=start, disable=not progress, desc="train", unit="step")
    tick, tick_step = time.perf_counter(), start
    end = c.train.steps if stop_at is None else min(stop_at, c.train.steps)
    preempted = False
    with preemption.Watch() as watch:
      for step in range(start, end):
        if scio_on and scio.stage_of(step, c.scio) != stage:
          stage = scio.stage_of(step, c.scio)
          if c.scio.mode == "offline":
            iterator = scio.enter_offline_stage(c, data, workdir, stage, relabel_fns[stage], state.params,
                                                iterator, mesh)
        local = next(iterator)
        local = {k: np.asarray(local[k]) for k in local
                 if k in step_lib.MODEL_INPUTS or k.startswith(("recon_", "neg_"))}
        batch = pipeline.global_batch(scio.reconstruction_inputs(local, c, stage) if scio_on else local, mesh)
        if scio_on and stage in ("B", "C") and c.scio.mode == "online":
          result = relabel_fns[stage](state.params, step_lib.model_inputs(batch),
                                      jax.random.fold_in(base_rng, step))
          if stage == "B":
            batch.update(recon_ids=result.removed_ids, recon_keyword_mask=result.removed_keyword_mask,
                         recon_clause_ids=result.removed_clause_ids)
          else:  # trained on, and reconstructed from, the corrected caption
            corrected = dict(text_ids=result.corrected_ids, keyword_mask=result.corrected_keyword_mask,
                             clause_ids=result.corrected_clause_ids)
            batch.update(corrected, **{recon: corrected[own] for recon, own in step_lib.RECON_KEYS.items()})
        state, metrics = train_step(state, batch, jax.random.fold_in(base_rng, step))
        done = step + 1
        preempted = watch.reached(done)
        if done % c.train.log_every == 0 or done == end or preempted:
          last = {k: float(v) for k, v in jax.device_get(metrics).items()}
          now = time.perf_counter()
          last["images_per_s"] = (done - tick_step) * c.train.batch_size / (now - tick)
          last["stage"] = "ABC".index(stage)
          # One in every run, SCIO's three stages included; more means steady-state recompiles.
          last["train_step_compilations"] = compiled.by_name[step_lib.JIT_NAME]
          tick, tick_step = now, done
          writer.train(done, last)
          bar.set_postfix(stage=stage, loss=f"{last['loss']:.3f}", img_s=f"{last['images_per_s']:.1f}")
        # Evaluated before the checkpoint: a run killed in between repeats the steps since the
        # last checkpoint and this evaluation with them, so no logged evaluation is ever missing.
        if evaluate is not None and not preempted and evaluation_due(c.eval, done):
          began = time.perf_counter()
          writer.eval(done, evaluate(done, graph, state.params))
          tick += time.perf_counter() - began  # evaluation time is not training throughput
        if done % c.train.ckpt_every == 0 or done == end or preempted:
          checkpoint.save(checkpoints, done, state, iterator)
        if preempted:
          break
        bar.update(1)
    bar.close()
  checkpoints.wait_until_finished()
  checkpoints.close()
  writer.close()
  if preempted:
    raise Preempted(done)
  return last


def evaluation_due(eval_config: ml_collections.ConfigDict, step: int) -> bool:
  """Whether the in-training evaluation runs after `step`: every `eval.every` steps (when > 0)
  and at each of `eval.at_steps`."""
  return (eval_config.every > 0 and step % eval_config.every == 0) or step in tuple(eval_config.at_steps)


def _initial_state(c, data: RunData, tx, mesh, workdir: str, abstract, shardings, imported: bool):
  """A fresh train state, with `klip import-hf`'s parameters when the workdir has them."""
  state = state_lib.initialise(c, data.codec.vocab_size, tx, mesh, shardings)
  if imported:
    path = checkpoint.init_params_path(workdir)
    params = checkpoint.restore_params(path, abstract.params, shardings.params)
    momentum = None if state.momentum_params is None else jax.tree.map(
        lambda x: x.copy(), state_lib.momentum_subset(params))
    state = state.replace(params=params, momentum_params=momentum)
    log.info("starting from the parameters in %s", path)
  return state
