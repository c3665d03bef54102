"""`klip train` end to end: exact resume in a new process, and a tiny model overfitting."""

import json
import os
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


def _env():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return env


def _klip(*args):
  subprocess.run([sys.executable, "-m", "klip_jax.cli", *args], check=True, env=_env(),
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _checkpoint(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step))
  params = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))["params"]
  data = {f: open(os.path.join(path, "data", f)).read() for f in os.listdir(os.path.join(path, "data"))
          if f.endswith(".json")}
  return params, data


@pytest.mark.slow
def test_sigterm_checkpoints_exits_0_and_the_rerun_equals_an_uninterrupted_run(tiny_data, tiny_tokenizer, tmp_path):
  """A SIGTERM (preemption) mid-run: the run checkpoints at the next step boundary and exits 0;
  running it again in a new process ends where an uninterrupted run ends, bit for bit."""
  steps = 24
  overrides = [f"--config.data.data_dir={tiny_data}", f"--config.data.tokenizer={tiny_tokenizer}",
               "--config.data.max_len=96", "--config.model.vision.image_size=48",
               f"--config.train.steps={steps}", "--config.train.batch_size=8", "--config.train.log_every=1",
               "--config.train.ckpt_every=12", "--config.momentum.queue_size=16", "--config.eval.every=0"]
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  _klip("train", "--config", "configs/tiny.py", "--workdir", straight, *overrides)
  run = subprocess.Popen([sys.executable, "-m", "klip_jax.cli", "train", "--config", "configs/tiny.py",
                          "--workdir", resumed, *overrides], env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(resumed, "metrics.jsonl")
  while run.poll() is None and not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 1):
    time.sleep(0.01)
  run.send_signal(signal.SIGTERM)  # after step 1, well before step 24
  _, err = run.communicate(timeout=120)
  assert run.returncode == 0, err
  stopped = [int(s) for s in os.listdir(os.path.join(resumed, "checkpoints"))]
  assert len(stopped) == 1 and 1 <= stopped[0] < steps and f"checkpointed at step {stopped[0]}" in err
  _klip("train", "--config", "configs/tiny.py", "--workdir", resumed, *overrides)

  params_a, data_a = _checkpoint(straight, steps)
  params_b, data_b = _checkpoint(resumed, steps)
  leaves_a, leaves_b = jax.tree.leaves(params_a), jax.tree.leaves(params_b)
  assert len(leaves_a) == len(leaves_b) > 50
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)
  assert data_a and data_a == data_b  # the iterators stand at the same place of the same order
  lines = lambda w: [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl"))]
  a, b = lines(straight), lines(resumed)
  assert [m["step"] for m in b] == list(range(1, steps + 1))
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
  _klip("train", "--config", "configs/tiny.py", "--workdir", workdir, "--config.data.synth.num_train=64",
        "--config.data.synth.num_val=16", "--config.data.synth.num_test=16", "--config.data.synth.noise_rate=0.0",
        "--config.data.flip=False", "--config.momentum.enabled=False", "--config.optim.lr=2e-3",
        "--config.optim.warmup_steps=20", "--config.optim.weight_decay=0.0", "--config.optim.grad_clip=1000.0",
        "--config.train.steps=500", "--config.train.batch_size=16", "--config.train.log_every=100",
        "--config.train.ckpt_every=500", "--config.eval.every=0")
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
  config.eval.every = 2
  calls = []

  def evaluate(step, graph, params):
    calls.append(step)
    assert isinstance(params, nnx.State)
    return {"fake": {"metric": step / 10}}

  workdir = str(tmp_path / "run")
  loop.train(config, workdir, prepare.locate(config, workdir), progress=False, evaluate=evaluate)
  assert calls == [2, 4]
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [m for m in lines if "eval" in m] == [{"step": 2, "eval": {"fake": {"metric": 0.2}}},
                                               {"step": 4, "eval": {"fake": {"metric": 0.4}}}]
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
