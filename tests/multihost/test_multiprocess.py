"""2 processes x 4 CPU devices (jax.distributed on localhost, gloo collectives) against 1 process
x 8 devices on the same global mesh: `klip train` with online SCIO, an offline SCIO round
(`klip relabel`), `klip eval`, `klip export` and `klip import-hf` give the same parameters,
caption rounds, results and files, and only process 0 writes the run's files. A single-process
8-device test cannot see multi-host bugs; this one can."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.xla import klip_env

# klip commands run as 1 and as 2 processes; one such run at a time (one pytest-xdist worker):
# two at once on two cores starve jax.distributed's heartbeats (100 s) and the service aborts.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multihost")]

_TIMEOUT_S = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _klip(args: list[str], processes: int, devices: int, sigterm_when=None) -> list[str]:
  """Run `klip ARGS` as `processes` processes of `devices` CPU devices each; fail with their
  stderr when any process fails, else return each one's stderr. `sigterm_when()` true sends
  SIGTERM to the last process alone (a preemption notice reaches one host of a pod first)."""
  env = klip_env(devices)
  command = [sys.executable, "-m", "klip_jax.cli", *args]
  if processes > 1:
    port = _free_port()
    commands = [command + ["--distributed", "--coordinator", f"localhost:{port}",
                           "--num-processes", str(processes), "--process-id", str(i)] for i in range(processes)]
  else:
    commands = [command]
  runs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for c in commands]
  while sigterm_when is not None and runs[-1].poll() is None and not sigterm_when():
    time.sleep(0.05)
  if sigterm_when is not None:
    runs[-1].send_signal(signal.SIGTERM)
  errors, stderr = [], []
  for i, run in enumerate(runs):
    try:
      _, err = run.communicate(timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      for r in runs:
        r.kill()
      raise AssertionError(f"process {i} of {' '.join(args)} hung (> {_TIMEOUT_S} s)") from None
    if run.returncode:
      errors.append(f"process {i} exited {run.returncode}:\n{err[-3000:]}")
    stderr.append(err)
  assert not errors, "\n".join(errors)
  return stderr


def _config_args(tiny_data, tiny_tokenizer, *overrides: str) -> list[str]:
  return ["--config", "configs/tiny.py:48px", f"--config.data.data_dir={tiny_data}",
          f"--config.data.tokenizer={tiny_tokenizer}", "--config.data.max_len=96",
          "--config.train.batch_size=16", "--config.train.log_every=1", "--config.train.keep=4",
          "--config.eval.every=0",
          "--config.scio.relabel_batch_size=16", *overrides]


def _saved_params(path: str) -> dict:
  """The tree saved at `path`, restored in this one process onto one device (whatever the
  processes and devices that saved it)."""
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(path).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), saved)
    return checkpointer.restore(path, target)


def _params(workdir: str, step: int) -> dict:
  return _saved_params(os.path.join(workdir, "checkpoints", str(step), "state"))["params"]


def _assert_same_tree(a, b, rtol=1e-5, atol=1e-5):
  """Equal up to float32 rounding: cross-process reductions sum in another order. The widest
  gap is in the attention key biases (~2e-6 after 6 steps): their exact gradient is zero (a
  softmax ignores a constant per query), so theirs is rounding noise, which Adam scales to ~lr."""
  flat_a = {k: v for k, v in _flatten(a)}
  flat_b = {k: v for k, v in _flatten(b)}
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_allclose(np.asarray(flat_a[k]), np.asarray(flat_b[k]), rtol=rtol, atol=atol, err_msg=k)


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f"{prefix}/{k}")
  else:
    yield prefix, tree


def _lines(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def _assert_only_process_0_wrote(one: str, two: str, train_runs: int = 1) -> None:
  """The same files in both workdirs (no leftover temporaries, one TensorBoard event file per
  `klip train` run, not one per process), and metrics.jsonl with the same lines, not one set
  per process."""
  def files(workdir):
    out = set()
    for root, _, names in os.walk(workdir):
      rel = os.path.relpath(root, workdir)
      if rel.startswith("checkpoints"):
        continue  # orbax writes these from every process, by design
      out |= {os.path.join(rel, n) for n in names if not n.startswith("events.out")}
    return out
  assert files(one) == files(two)
  assert not [f for f in files(two) if ".tmp-" in f or ".old-" in f]
  if not train_runs:
    return
  assert len(os.listdir(os.path.join(two, "logs"))) == train_runs
  lines_one, lines_two = _lines(os.path.join(one, "metrics.jsonl")), _lines(os.path.join(two, "metrics.jsonl"))
  assert [m["step"] for m in lines_one] == [m["step"] for m in lines_two]
  for a, b in zip(lines_one, lines_two):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)


def _scio(*more: str) -> list[str]:
  return ["--config.train.steps=6", "--config.scio.stage_a_steps=1", "--config.scio.stage_b_steps=2",
          "--config.scio.stage_c_steps=3", *more]


def test_training_matches_one_process_and_resumes_in_one(tiny_data, tiny_tokenizer, tmp_path):
  """Online SCIO (each batch relabelled before its step) through stages A, B, C: 2 processes
  train on mesh (data=8) until a SIGTERM to process 1 alone after step 1 stops both at one step
  k, checkpointed, exit status 0; 1 process resumes that checkpoint on (fsdp=4, tensor=2) to
  step 6. Parameters, losses and data positions equal 1 process on (data=8) throughout, and
  only process 0 wrote the run's files."""
  args = lambda w, *more: ["train", "--workdir", w, *_config_args(tiny_data, tiny_tokenizer, *_scio(*more))]
  one, two = str(tmp_path / "run_1x8"), str(tmp_path / "run_2x4")
  _klip(args(one, "--config.train.ckpt_every=1", "--config.train.keep=6"), 1, 8)
  metrics = os.path.join(two, "metrics.jsonl")
  stderr = _klip(args(two, "--config.train.ckpt_every=2"), 2, 4,
                 sigterm_when=lambda: os.path.exists(metrics) and len(_lines(metrics)) >= 1)
  saved = sorted(int(s) for s in os.listdir(os.path.join(two, "checkpoints")) if s.isdigit())
  k = saved[-1]
  assert 1 <= k < 6, f"the SIGTERM did not stop the run early: checkpoints {saved}"
  assert all(f"checkpointed at step {k}" in err for err in stderr), stderr[0][-2000:]
  for step in saved:
    _assert_same_tree(_params(one, step), _params(two, step))
  # Each host's data iterator stands at the same global batch as the single process's.
  data = lambda w: os.path.join(w, "checkpoints", str(k), "data")
  states = {w: [json.load(open(os.path.join(data(w), f))) for f in sorted(os.listdir(data(w))) if f.endswith(".json")]
            for w in (one, two)}
  assert len(states[one]) == 1 and states[two] == states[one] * 2
  _klip(args(two, "--config.mesh.shape=(1,4,2)"), 1, 8)
  _assert_same_tree(_params(one, 6), _params(two, 6))
  _assert_only_process_0_wrote(one, two, train_runs=2)


def test_relabelling_and_eval_match_one_process(tiny_data, tiny_tokenizer, tmp_path):
  """From the same checkpoint, an offline SCIO round (`klip relabel`: caption round 1) and
  `klip eval` on a small task set, as 2 processes, write what 1 process writes."""
  from klip_jax import config as config_lib
  from tests.workdir import saved_workdir

  config = config_lib.load("configs/tiny.py:48px")
  config.data.update(data_dir=tiny_data, tokenizer=tiny_tokenizer, max_len=96)
  config.scio.update(stage_a_steps=1, stage_b_steps=2, stage_c_steps=3, relabel_batch_size=16)
  config.train.update(steps=6, batch_size=16)
  one, two = str(tmp_path / "run_1x8"), str(tmp_path / "run_2x4")
  params, _ = saved_workdir(config, one, step=6)
  saved_workdir(config, two, step=6, params=params)
  for workdir, processes, devices in ((one, 1, 8), (two, 2, 4)):
    _klip(["relabel", "--workdir", workdir], processes, devices)
    _klip(["eval", "--workdir", workdir, *_config_args(tiny_data, tiny_tokenizer, *_scio(
           "--config.eval.tasks=retrieval,itm,scio_repair", "--config.eval.random_baseline=False"))],
          processes, devices)
  path = os.path.join("captions", "round_1", "overlay.jsonl")
  a, b = _lines(os.path.join(one, path)), _lines(os.path.join(two, path))
  assert len(a) == len(b) == 48 and any(x["flagged"] for x in a)
  for x, y in zip(a, b):
    assert (x["id"], x["flagged"], x["corrected_keyword"]) == (y["id"], y["flagged"], y["corrected_keyword"])
    np.testing.assert_allclose(x["itm"], y["itm"], atol=1e-4)
  results = [json.load(open(os.path.join(w, "eval", "results.json"))) for w in (one, two)]
  assert results[0]["tasks"].keys() == {"retrieval", "itm", "scio_repair"}
  _assert_same_tree(results[0]["tasks"], results[1]["tasks"], rtol=1e-4, atol=1e-4)
  _assert_only_process_0_wrote(one, two, train_runs=0)


def test_export_and_import_hf_match_one_process(tiny_data, tiny_tokenizer, tmp_path):
  """`klip export` and `klip import-hf` as 2 processes x 4 devices write what one process
  writes, exactly: every process restores and gathers the parameters, process 0 alone writes
  the HF folders; every process saves its shards of the imported parameters."""
  # The test extra installs transformers (and safetensors with it); a JAX-only install skips this.
  from tests.export import NO_EXPORT

  pytest.importorskip("transformers", reason=NO_EXPORT)
  from safetensors import numpy as safetensors_numpy

  from klip_jax import config as config_lib
  from klip_jax.export import commands
  from tests.export import parity

  config = config_lib.load("configs/tiny.py:48px")
  config.data.update(data_dir=tiny_data, tokenizer=tiny_tokenizer, max_len=96)
  workdir = str(tmp_path / "run")
  parity.trained_workdir(config, workdir, seed=1, step=7)
  one, two = str(tmp_path / "hf_1x8"), str(tmp_path / "hf_2x4")
  commands.export_workdir(workdir, one)  # this process: 1 x 8 devices
  _klip(["export", "--workdir", workdir, "--out", two], 2, 4)
  for name in ("retrieval", "captioning"):
    assert sorted(os.listdir(os.path.join(one, name))) == sorted(os.listdir(os.path.join(two, name)))
    a, b = (safetensors_numpy.load_file(os.path.join(d, name, "model.safetensors")) for d in (one, two))
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert sorted(os.listdir(tmp_path)) == ["hf_1x8", "hf_2x4", "run"]  # no temporaries left

  args = lambda w: ["import-hf", two, "--workdir", w, "--config", "configs/tiny.py:48px",
                    f"--config.data.data_dir={tiny_data}", f"--config.data.tokenizer={tiny_tokenizer}",
                    "--config.data.max_len=96"]
  commands.import_hf(two, config, str(tmp_path / "import_1x8"))
  _klip(args(str(tmp_path / "import_2x4")), 2, 4)
  restored = [_saved_params(os.path.join(tmp_path, w, "init_params")) for w in ("import_1x8", "import_2x4")]
  _assert_same_tree(*restored, rtol=0, atol=0)
  assert os.path.exists(os.path.join(tmp_path, "import_2x4", "config.json"))
