"""`klip train` end to end: exact resume in a new process, and a tiny model overfitting."""

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from tensorboardX.proto import event_pb2

from klip_jax import config as config_lib
from klip_jax.data import pipeline, prepare
from klip_jax.data.tokenizer import TokenIds
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import checkpoint, loop
from klip_jax.train import state as state_lib
from klip_jax.train import step as step_lib
from tests.xla import klip_env, optimized_xla


def _klip(*args):
  subprocess.run([sys.executable, "-m", "klip_jax.cli", *args], check=True, env=klip_env(1),
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _checkpoint(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step))
  params = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))["params"]
  data = {f: open(os.path.join(path, "data", f)).read() for f in os.listdir(os.path.join(path, "data"))
          if f.endswith(".json")}
  return params, data


def _train_until(args, metrics: str, lines: int, sig: int) -> subprocess.Popen:
  """Start `klip ARGS`, send it `sig` once `metrics` has `lines` lines; returns the process."""
  run = subprocess.Popen([sys.executable, "-m", "klip_jax.cli", *args], env=klip_env(1), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
  while run.poll() is None and not (os.path.exists(metrics) and open(metrics).read().count("\n") >= lines):
    time.sleep(0.01)
  run.send_signal(sig)
  return run


@pytest.mark.slow
def test_sigterm_and_sigkill_then_rerun_equal_an_uninterrupted_run(tiny_data, tiny_tokenizer, tmp_path):
  """A SIGTERM (preemption) after step 1: the run checkpoints at the next step boundary and
  exits 0. Its rerun is SIGKILLed at a random step past the step-12 checkpoint, and a checkpoint
  write is found cut short: the next rerun restores the last whole checkpoint. The run ends
  where an uninterrupted run ends, bit for bit, and its metrics log reads as that run's."""
  steps = 24
  overrides = [f"--config.data.data_dir={tiny_data}", f"--config.data.tokenizer={tiny_tokenizer}",
               "--config.data.max_len=96", "--config.model.vision.image_size=48",
               f"--config.train.steps={steps}", "--config.train.batch_size=8", "--config.train.log_every=1",
               "--config.train.ckpt_every=12", "--config.momentum.queue_size=16", "--config.eval.every=0"]
  train = lambda workdir: ["train", "--config", "configs/tiny.py", "--workdir", workdir, *overrides]
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  metrics, checkpoints = os.path.join(resumed, "metrics.jsonl"), os.path.join(resumed, "checkpoints")
  _klip(*train(straight))

  run = _train_until(train(resumed), metrics, 1, signal.SIGTERM)
  _, err = run.communicate(timeout=120)
  assert run.returncode == 0, err
  stopped = [int(s) for s in os.listdir(checkpoints)]
  assert len(stopped) == 1 and 1 <= stopped[0] < 12 and f"checkpointed at step {stopped[0]}" in err

  at = random.Random().randint(13, steps - 1)  # past the step-12 checkpoint
  run = _train_until(train(resumed), metrics, at, signal.SIGKILL)
  run.communicate(timeout=120)
  assert run.returncode == -signal.SIGKILL, f"the run ended before step {at}"
  # Step 12's checkpoint is written asynchronously: a kill soon after may cut that write short.
  assert sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())[-1] in (stopped[0], 12), at
  # A write of step 24 cut short (orbax writes into a temporary folder, renamed when complete).
  cut = os.path.join(checkpoints, "24.orbax-checkpoint-tmp-1796170000")
  shutil.copytree(os.path.join(straight, "checkpoints", "12"), cut)
  for root, _, names in os.walk(cut):
    for name in names:
      os.truncate(os.path.join(root, name), 0)
  _klip(*train(resumed))

  params_a, data_a = _checkpoint(straight, steps)
  params_b, data_b = _checkpoint(resumed, steps)
  leaves_a, leaves_b = jax.tree.leaves(params_a), jax.tree.leaves(params_b)
  assert len(leaves_a) == len(leaves_b) > 50
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b, err_msg=f"killed at step {at}")
  assert data_a and data_a == data_b  # the iterators stand at the same place of the same order
  lines = lambda w: [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl"))]
  a, b = lines(straight), lines(resumed)
  assert [m["step"] for m in b] == list(range(1, steps + 1)), f"killed at step {at}"
  for x, y in zip(a, b):
    assert x["loss"] == y["loss"] and x["loss_itc"] == y["loss_itc"]  # same batches, same math
  # The step compiled once per process; the steps (and a resume) never recompiled it.
  assert {m["train_step_compilations"] for m in a} == {1} and {m["train_step_compilations"] for m in b} == {1}
  assert os.listdir(os.path.join(straight, "logs"))[0].startswith("events.out.tfevents")


def _evaluate(config, data, mesh, graph, state):
  """Mean metrics over the whole (64-example) train split, without augmentation."""
  tokens = TokenIds.from_codec(data.codec)
  options = pipeline.PipelineOptions(data.data_dir, "train", 16, train=False)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    evaluate = jax.jit(step_lib.eval_step_fn(config, graph, tokens))
    results = [jax.device_get(evaluate(state, step_lib.model_inputs(batch), jax.random.key(0)))
               for batch in pipeline.build(options, data.codec)]
  return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


@pytest.mark.slow
def test_tiny_model_overfits_64_examples(tmp_path):
  workdir = str(tmp_path / "overfit")
  # Trained by `klip train` in a process of its own on one CPU device (batches of 16 spread over
  # 8 virtual devices on 2 cores cost ~2x the time); evaluated here on the 8-device mesh.
  with optimized_xla():  # 400 steps: XLA's optimizations pay for their compile time
    _klip("train", "--config", "configs/tiny.py", "--workdir", workdir, "--config.data.synth.num_train=64",
          "--config.data.synth.num_val=16", "--config.data.synth.num_test=16", "--config.data.synth.noise_rate=0.0",
          "--config.data.flip=False", "--config.data.max_len=96", "--config.momentum.enabled=False",
          "--config.optim.lr=3e-3", "--config.optim.warmup_steps=20", "--config.optim.weight_decay=0.0",
          "--config.optim.grad_clip=1000.0",
          "--config.train.steps=400", "--config.train.batch_size=16", "--config.train.log_every=100",
          "--config.train.ckpt_every=400", "--config.eval.every=0")
  config = config_lib.load_saved(os.path.join(workdir, "config.json"))
  data = prepare.locate(config, workdir)
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  graph, state = checkpoint.restore(config, workdir, data.codec.vocab_size, mesh)
  tx, _ = state_lib.make_optimizer(config.optim, config.train.steps)
  _, initial, _ = state_lib.create(config, data.codec.vocab_size, tx, mesh)
  before, after = _evaluate(config, data, mesh, graph, initial), _evaluate(config, data, mesh, graph, state)
  assert after["itc_acc"] > 0.95, after
  assert after["itm_acc"] > 0.95, after
  assert after["loss_recon"] < 0.2 * before["loss_recon"], (before, after)


@pytest.mark.slow  # a whole (short) training run
def test_the_loop_runs_its_evaluation_hook_at_the_configured_steps(tiny_data, tiny_tokenizer, tmp_path):
  config = config_lib.load("configs/tiny.py:48px")
  config.data.update(data_dir=tiny_data, tokenizer=tiny_tokenizer, max_len=96)
  config.train.update(steps=5, batch_size=8, log_every=5, ckpt_every=5)
  config.momentum.update(queue_size=16)
  config.eval.update(every=2, at_steps=(1, 4, 5))  # every 2 steps and at these (4 once)
  calls = []

  def evaluate(step, graph, params):
    calls.append(step)
    assert isinstance(params, nnx.State)
    return {"fake": {"metric": step / 10}}

  workdir = str(tmp_path / "run")
  loop.train(config, workdir, prepare.locate(config, workdir), progress=False, evaluate=evaluate)
  assert calls == [1, 2, 4, 5]
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [m for m in lines if "eval" in m] == [{"step": s, "eval": {"fake": {"metric": s / 10}}} for s in calls]
  assert [m["step"] for m in lines if "eval" not in m] == [5]
  logs = os.path.join(workdir, "logs")
  tags = set().union(*(_event_tags(os.path.join(logs, name)) for name in os.listdir(logs)))
  assert {"eval/fake/metric", "train/loss"} <= tags


def _event_tags(path: str) -> set[str]:
  """Scalar tags of a TensorBoard event file, read as TFRecords: [u64 length][u32 crc][Event][u32 crc]."""
  data, tags, at = open(path, "rb").read(), set(), 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
    tags |= {v.tag for v in event.summary.value}
    at += 12 + length + 4
  return tags
