"""What `klip bench` measures is what it says: captions split over the devices as `klip eval`
splits them, the compilations after the first step counted from the second step on, PyTorch
compared only on the hardware jax runs on, bad --rounds refused before any work, and the MFU
of a PCIe or NVL GPU against its own datasheet peak."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import pytest

from klip_jax import config as config_lib
from klip_jax.bench import caption, hf_blip, peak, suite
from klip_jax.bench import inputs as inputs_lib
from klip_jax.bench import train as train_bench
from klip_jax.errors import ConfigError
from klip_jax.train import step as step_lib

VOCAB = 300


@pytest.fixture
def tiny():
  c = config_lib.load("configs/tiny.py")
  c.train.batch_size = 8
  c.data.max_len = c.model.text.max_len = 40
  return c


def _run_once(outputs):
  """A stand-in for timing.interleaved: each contender called once, its output kept, 1 s each."""
  def interleaved(contenders, *, rounds):
    del rounds
    for name, fn in contenders.items():
      outputs[name] = fn()
    return {name: 1.0 for name in contenders}
  return interleaved


def test_captions_are_split_over_the_devices_not_repeated_on_each(tiny, monkeypatch):
  devices = jax.device_count()
  assert devices == 8  # tests/conftest.py's virtual CPU devices; the bench's mesh spans them all
  outputs = {}
  monkeypatch.setattr(caption.timing, "interleaved", _run_once(outputs))
  caption.throughput(tiny, VOCAB, max_len=4, beam_size=2, rounds=1)
  for name in ("klip_jax_greedy", "klip_jax_beam"):
    ids = outputs[name]
    assert ids.shape == (8, 4)
    # 8 captions over 8 devices: each device decodes its own 1, not all 8.
    assert {shard.data.shape[0] for shard in ids.addressable_shards} == {8 // devices}


class _State(NamedTuple):
  """A stand-in train state (a pytree) with the `params` the benchmark counts."""
  params: dict
  count: jax.Array


def test_a_recompilation_at_the_second_step_is_counted(tiny, monkeypatch):
  # A step whose output state differs in dtype from its first input (an int32 counter comes
  # back float32): the second step compiles again, once, and then never.
  def make_train_step(*args, **kwargs):
    def train_step(state, batch, rng):
      del rng
      return _State(state.params, state.count.astype(jnp.float32) + 1), {"loss": jnp.sum(batch["image"])}
    return jax.jit(train_step)

  state = _State({"w": jnp.ones(3)}, jnp.zeros((), jnp.int32))
  mesh, *_ = inputs_lib.fresh_model(tiny, VOCAB)
  monkeypatch.setattr(train_bench.inputs, "fresh_model", lambda *a: (mesh, None, state, None, None, None))
  monkeypatch.setattr(train_bench.step_lib, "make_train_step", make_train_step)
  monkeypatch.setattr(train_bench.flops_lib, "train_step", lambda *a: 1.0)
  result = train_bench.throughput(tiny, VOCAB, steps=3, rounds=1)
  assert step_lib.JIT_NAME == "jit(train_step)"
  assert result["klip_jax"]["compilations_steady_state"] == 1


@pytest.mark.parametrize("rounds", [0, -2])
def test_rounds_below_one_are_refused_before_any_work(tiny, monkeypatch, rounds):
  monkeypatch.setattr(suite.train_bench, "throughput", lambda *a, **k: pytest.fail("the step ran"))
  with pytest.raises(ConfigError, match=f"--rounds {rounds}"):
    suite.run(["train"], tiny, vocab_size=VOCAB, rounds=rounds)


@pytest.mark.parametrize("backend,gpus,cuda,why", [
    ("tpu", 4, False, "no TPU"),
    ("gpu", 1, False, "cannot use the GPU"),
    ("gpu", 8, True, "8 GPUs"),
])
def test_hf_is_compared_only_on_the_hardware_jax_runs_on(monkeypatch, backend, gpus, cuda, why):
  torch = pytest.importorskip("torch", reason="--compare-hf runs PyTorch: the test or export extra")
  monkeypatch.setattr(hf_blip.jax, "default_backend", lambda: backend)
  monkeypatch.setattr(hf_blip.jax, "device_count", lambda: gpus)
  monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
  with pytest.raises(ConfigError, match=why):
    hf_blip.device()


def test_hf_runs_beside_jax_on_one_gpu_and_on_the_cpu_devices(monkeypatch):
  torch = pytest.importorskip("torch", reason="--compare-hf runs PyTorch: the test or export extra")
  assert str(hf_blip.device()) == "cpu"  # 8 virtual CPU devices share this host's cores with torch
  monkeypatch.setattr(hf_blip.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(hf_blip.jax, "device_count", lambda: 1)
  monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
  assert str(hf_blip.device()) == "cuda"


def test_pcie_and_nvl_gpus_have_their_own_peaks():
  # NVIDIA's datasheets, dense bf16 (half the listed with-sparsity figure): H100 PCIe 1,513 / 2,
  # H100 NVL and H200 NVL 1,671 / 2, H100 and H200 SXM 1,979 / 2.
  assert peak.device_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(1513 / 2, abs=1)
  assert peak.device_peak_tflops("NVIDIA H100 NVL") == pytest.approx(1671 / 2, abs=1)
  assert peak.device_peak_tflops("NVIDIA H200 NVL") == pytest.approx(1671 / 2, abs=1)
  assert peak.device_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(1979 / 2, abs=1)
  assert peak.device_peak_tflops("NVIDIA H200") == pytest.approx(1979 / 2, abs=1)
  # MFU against the PCIe part's peak: 1.512e15 FLOP in 2 s on one chip is 0.756 PFLOP/s, all of it.
  assert peak.mfu(1.512e15, 2.0, 1, peak.device_peak_tflops("NVIDIA H100 PCIe")) == pytest.approx(1.0)
