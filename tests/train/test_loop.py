"""`klip train` end to end: exact resume in a new process, and a tiny model overfitting."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from klip_jax import config as config_lib
from klip_jax.data import pipeline
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import loop
from klip_jax.train import state as state_lib
from klip_jax.train import step as step_lib


def _klip(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  subprocess.run([sys.executable, "-m", "klip_jax.cli", *args], check=True, env=env,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _checkpoint(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step))
  params = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))["params"]
  data = {f: open(os.path.join(path, "data", f)).read() for f in os.listdir(os.path.join(path, "data"))
          if f.endswith(".json")}
  return params, data


def test_resume_in_a_new_process_equals_an_uninterrupted_run(tiny_data, tiny_tokenizer, tmp_path):
  overrides = [f"--config.data.data_dir={tiny_data}", f"--config.data.tokenizer={tiny_tokenizer}",
               "--config.data.max_len=96", "--config.model.vision.image_size=48",
               "--config.train.steps=6", "--config.train.batch_size=8", "--config.train.log_every=1",
               "--config.train.ckpt_every=3", "--config.momentum.queue_size=16"]
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  _klip("train", "--config", "configs/tiny.py", "--workdir", straight, *overrides)
  _klip("train", "--config", "configs/tiny.py", "--workdir", resumed, "--stop-at", "3", *overrides)
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["3"]
  _klip("train", "--config", "configs/tiny.py", "--workdir", resumed, *overrides)

  params_a, data_a = _checkpoint(straight, 6)
  params_b, data_b = _checkpoint(resumed, 6)
  leaves_a, leaves_b = jax.tree.leaves(params_a), jax.tree.leaves(params_b)
  assert len(leaves_a) == len(leaves_b) > 50
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)
  assert data_a and data_a == data_b  # the iterators stand at the same place of the same order
  lines = lambda w: [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl"))]  # noqa: E731
  a, b = lines(straight), lines(resumed)
  assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
  for x, y in zip(a, b):
    assert x["loss"] == y["loss"] and x["loss_itc"] == y["loss_itc"]  # same batches, same math
  assert os.listdir(os.path.join(straight, "logs"))[0].startswith("events.out.tfevents")


def _evaluate(config, run, graph, state):
  """Mean metrics over the whole (64-example) train split, without augmentation."""
  tokens = step_lib.TokenIds.from_codec(run.codec)
  options = pipeline.PipelineOptions(run.data_dir, "train", 16, train=False)
  with mesh_lib.logical_context(run.mesh, config.mesh.rules):
    evaluate = jax.jit(step_lib.eval_step_fn(config, graph, tokens))
    results = [jax.device_get(evaluate(state, step_lib.model_inputs(batch), jax.random.key(0)))
               for batch in pipeline.build(options, run.codec)]
  return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


def test_tiny_model_overfits_64_examples(tmp_path):
  config = config_lib.load("configs/tiny.py")
  config.data.synth.update(num_train=64, num_val=16, num_test=16, noise_rate=0.0)
  config.data.flip = False
  config.momentum.update(enabled=False)
  config.optim.update(lr=2e-3, warmup_steps=20, weight_decay=0.0, grad_clip=1000.0)
  config.train.update(steps=400, batch_size=16, log_every=100, ckpt_every=400)
  workdir = str(tmp_path / "overfit")
  loop.train(config, workdir, progress=False)
  run, graph, state = loop.restore(config, workdir)
  tx, _ = state_lib.make_optimizer(config.optim, config.train.steps)
  _, initial, _ = state_lib.create(config, run.codec.vocab_size, tx, run.mesh)
  before, after = _evaluate(config, run, graph, initial), _evaluate(config, run, graph, state)
  assert after["itc_acc"] > 0.95, after
  assert after["itm_acc"] > 0.95, after
  assert after["loss_recon"] < 0.2 * before["loss_recon"], (before, after)
