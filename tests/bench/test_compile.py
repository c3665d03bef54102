"""`klip compile` (klip_jax/bench/aot.py): topology names, the fit decision and its message, the
speed arithmetic against hand-computed values; the steps compiled on CPU devices; and, where
libtpu is installed, configs/tiny.py compiled for a TPU slice through the command itself."""

import json
import os
import subprocess
import sys

import jax
import pytest

from klip_jax import cli
from klip_jax import config as config_lib
from klip_jax.bench import aot
from klip_jax.errors import ConfigError
from klip_jax.parallel import mesh as mesh_lib

GIB = 2**30


@pytest.mark.parametrize("name,generation,shape,chips", [
    ("v5e:16x16", "v5e", (16, 16), 256),
    ("v5e:2x4", "v5e", (2, 4), 8),
    ("v5e-16", "v5e", (4, 4), 16),  # v5e and v6e accelerator types count chips
    ("v5litepod-8", "v5e", (2, 4), 8),
    ("v5e-1", "v5e", (1, 1), 1),
    ("v6e-8", "v6e", (2, 4), 8),
    ("v6e-256", "v6e", (16, 16), 256),
    ("v5p-8", "v5p", (2, 2, 1), 4),  # v4 and v5p accelerator types count TensorCores, 2 per chip
    ("v5p-128", "v5p", (4, 4, 4), 64),
    ("v5p:2x2x2", "v5p", (2, 2, 2), 8),
    ("v4-8", "v4", (2, 2, 1), 4),
    ("v4-32", "v4", (2, 2, 4), 16),
    ("v4-64", "v4", (2, 4, 4), 32),
    ("V4:4x4x8", "v4", (4, 4, 8), 128),
])
def test_topology_names(name, generation, shape, chips):
  topology = aot.parse_topology(name)
  assert (topology.generation, topology.shape, topology.chips) == (generation, shape, chips)
  assert topology.name == f"{generation}:{'x'.join(map(str, shape))}"


@pytest.mark.parametrize("name,message", [
    ("v7:2x2", r"unknown TPU generation 'v7'"),
    ("tpu", r"not a topology name"),
    ("v5e:2x2x2", r"v5e slice is a 2D torus"),
    ("v4:2x2", r"v4 slice is a 3D torus"),
    ("v5p-6", r"no standard slice of 3 chips.*v5p:2x2x2"),
    ("v5p-7", r"counts TensorCores, 2 per chip"),
    ("v5e-512", r"at most 256 chips"),
])
def test_bad_topology_names_say_what_to_give(name, message):
  with pytest.raises(ConfigError, match=message):
    aot.parse_topology(name)


def test_chips_have_the_datasheet_hbm_and_peaks():
  table = {g: (c.hbm_gib, c.peak_tflops) for g, c in aot.CHIPS.items()}
  assert table == {"v4": (32, 275), "v5e": (16, 197), "v5p": (95, 459), "v6e": (32, 918)}


@pytest.mark.parametrize("text,shape", [("16,1,1", (16, 1, 1)), ("1,-1,1", (1, -1, 1)), ("data", (-1, 1, 1)),
                                        ("fsdp", (1, -1, 1))])
def test_mesh_text(text, shape):
  assert aot.parse_mesh(text) == shape


@pytest.mark.parametrize("text", ["16,1", "a,b,c", "1,0,1", "1,-2,1"])
def test_bad_mesh_text(text):
  with pytest.raises(ConfigError, match=r"--mesh .*data,fsdp,tensor"):
    aot.parse_mesh(text)


def test_fit_decision():
  assert aot.fits(16 * GIB, 16)
  assert not aot.fits(16 * GIB + 1, 16)
  assert not aot.fits(None, 95)  # the compiler refused the program


def test_speed_arithmetic_by_hand():
  # 1e13 FLOPs per chip on a 197 TFLOP/s chip: 50.76 ms at peak, 126.9 ms at 40% MFU;
  # 256 images in 126.9 ms: 256 * 0.4 * 197e12 / 1e13 = 2017.28 images/s.
  assert aot.step_seconds_at_peak(1e13, 197) == pytest.approx(0.0507614, rel=1e-5)
  assert aot.examples_per_s(256, 1e13, 197) == pytest.approx(2017.28, rel=1e-9)
  assert aot.examples_per_s(256, 1e13, 197, mfu=1.0) == pytest.approx(5043.2, rel=1e-9)


def _step(name="train_step", total_gib=None, batch=256, flops=1e13, error=""):
  if total_gib is None:
    return aot.StepReport(name, batch, error=error or "RESOURCE_EXHAUSTED: Ran out of memory in hbm")
  return aot.StepReport(name, batch, argument=2 * GIB, output=2 * GIB, temp=int((total_gib - 3) * GIB),
                        alias=GIB, flops=flops, compile_s=61.0)


def _report(steps, mesh=(16, 1, 1), remat="none", topology="v5e:4x4"):
  return aot.Report("configs/base.py", aot.parse_topology(topology), "TPU v5 lite", mesh, remat, steps)


def test_step_total_counts_aliased_buffers_once_and_adds_what_stays_resident():
  step = aot.StepReport("relabel_step", 64, argument=10, output=4, temp=7, alias=3, resident=100)
  assert step.total == 10 + 4 + 7 - 3 + 100
  assert aot.StepReport("train_step", 64).total is None


def test_report_fits_only_when_every_step_fits():
  assert _report([_step(total_gib=12), _step("relabel_step", total_gib=15.9)]).fits
  assert not _report([_step(total_gib=12), _step("relabel_step", total_gib=16.1)]).fits
  assert not _report([_step(total_gib=None), _step("relabel_step", total_gib=1)]).fits


def test_json_and_markdown_carry_the_hand_computed_numbers():
  report = _report([_step(total_gib=12)])
  entry = report.to_json()["steps"][0]
  assert entry["total_gib"] == pytest.approx(12) and entry["fits"]
  assert entry["examples_per_s_at_mfu"] == pytest.approx(2017.28)
  assert entry["step_s_at_peak"] == pytest.approx(0.0507614, rel=1e-5)
  row = aot.markdown([report]).splitlines()[2]
  assert row == ("| configs/base.py | v5e:4x4 (16 chips) | 16,1,1 | none | train_step | 256 | 2 | 9 | 2 "
                 "| 12 | 16 | yes | 10 | 50.8 | 2.02e+03 | 61 |")


def test_alternatives_try_stricter_remat_then_full_fsdp():
  base = config_lib.load("configs/base.py")
  assert aot.alternatives(base, (16, 1, 1)) == [
      ((16, 1, 1), "dots"), ((16, 1, 1), "dots_no_batch"), ((16, 1, 1), "full"),
      ((1, 16, 1), "none"), ((1, 16, 1), "dots"), ((1, 16, 1), "dots_no_batch"), ((1, 16, 1), "full")]
  large = config_lib.load("configs/large.py")  # already dots_no_batch
  assert aot.alternatives(large, (4, 2, 1)) == [((4, 2, 1), "full"), ((1, 8, 1), "dots_no_batch"),
                                                ((1, 8, 1), "full")]
  assert aot.alternatives(large, (1, 8, 1)) == [((1, 8, 1), "full")]


def test_not_fitting_message_names_the_problem_and_the_fix():
  failed = _report([_step(total_gib=21.5), _step("relabel_step", total_gib=9)])
  found = _report([_step(total_gib=11.5), _step("relabel_step", total_gib=9)], mesh=(1, 16, 1), remat="full")
  message = aot.not_fitting_message(failed, found, [((16, 1, 1), "dots", "does not fit")])
  assert message == (
      "configs/base.py does not fit v5e:4x4 (16 GiB HBM per chip) on mesh (data,fsdp,tensor)=(16,1,1) with "
      "remat none: train_step needs 21.5 GiB per chip. It fits with --mesh 1,16,1 "
      "--config.model.vision.remat=full --config.model.text.remat=full (compiled: 11.5 GiB per chip at most).")
  refused = _report([_step(total_gib=None)])
  message = aot.not_fitting_message(refused, None, [((16, 1, 1), "dots", "does not fit"),
                                                    ((1, 16, 1), "none", "skipped")])
  assert "the TPU compiler rejects train_step (RESOURCE_EXHAUSTED" in message
  assert "No alternative tried fits (mesh 16,1,1 remat dots: does not fit; mesh 1,16,1 remat none: skipped)" in message
  assert message.endswith("Try a slice with more chips and --mesh fsdp, a smaller --global-batch or stricter remat "
                          "(--config.model.vision.remat=full --config.model.text.remat=full).")
  both = _report([_step(total_gib=None), _step("relabel_step", total_gib=17)], mesh=(1, 16, 1), remat="full")
  message = aot.not_fitting_message(both, None, [])
  assert ("rejects train_step (RESOURCE_EXHAUSTED: Ran out of memory in hbm); relabel_step needs 17 GiB per "
          "chip.") in message
  assert message.endswith("Try a slice with more chips or a smaller --global-batch.")
  assert "No alternative was compiled (--search 0)" in aot.not_fitting_message(refused, None, [])


def test_compile_command_checks_its_arguments_before_compiling(capsys):
  assert cli.main(["compile", "--config", "configs/tiny.py", "--topology", "v9:2x2"]) == 2
  assert "unknown TPU generation 'v9'" in capsys.readouterr().err
  assert cli.main(["compile", "--config", "configs/tiny.py", "--topology", "v5e:2x2", "--mesh", "2,2"]) == 2
  assert "--mesh '2,2'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small():
  """configs/tiny.py cut down further: compiling its train step on CPU still takes ~1 minute."""
  config = config_lib.load("configs/tiny.py")
  config.train.batch_size = 8
  config.data.max_len = config.model.text.max_len = 24
  config.model.vision.depth = config.model.text.depth = 1
  config.scio.update(max_clauses=3, max_fill=2)
  return config


def test_relabel_step_compiles_on_cpu_devices_with_the_train_state_resident_beside_it(small):
  mesh = mesh_lib.make_mesh((2, 4, 1), jax.devices()[:8])
  (relabel,) = aot.compile_steps(small, 300, mesh, steps=("relabel",))
  assert relabel.step == "relabel_step" and not relabel.error
  assert relabel.argument > 0 and relabel.temp > 0 and relabel.flops > 0
  assert relabel.batch == 8  # online SCIO relabels the train batch
  assert relabel.resident > 0 and relabel.total == (relabel.argument + relabel.output + relabel.temp
                                                    - relabel.alias + relabel.resident)
  offline = small.copy_and_resolve_references()
  offline.scio.mode = "offline"
  assert aot.relabel_batch(offline) == offline.scio.relabel_batch_size


@pytest.mark.slow
def test_bench_memory_compiles_the_train_step_on_cpu_devices(small):
  """`klip bench memory`'s path through the same compile."""
  memory = aot.compiled_memory(small, 300, (1, 4, 1))
  assert memory["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and memory["fits"]
  assert 0 < memory["total_gib"] < 1 and memory["alias_gib"] > 0 and memory["flops_per_device"] > 0


def _klip_compile(*args, timeout=900):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "klip_jax.cli", "compile", *args], capture_output=True,
                        text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_tiny_compiles_for_a_tpu_slice(tmp_path):
  """The real TPU compiler via libtpu, no TPU needed; a subprocess keeps libtpu out of this one."""
  pytest.importorskip("libtpu", reason="compiling for a TPU slice needs libtpu: pip install -e '.[tpu]'")
  out = tmp_path / "compile.json"
  run = _klip_compile("--config", "configs/tiny.py", "--topology", "v5e:2x2", "--mesh", "1,-1,1",
                      "--json", str(out))
  assert run.returncode == 0, run.stderr[-3000:]
  (report,) = json.loads(out.read_text())
  assert (report["topology"], report["chips"], report["device_kind"]) == ("v5e:2x2", 4, "TPU v5 lite")
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and report["fits"]
  assert (report["hbm_gib"], report["peak_tflops"], report["mfu"]) == (16, 197, 0.4)
  train, relabel = report["steps"]
  assert (train["step"], train["batch"], relabel["step"], relabel["batch"]) == ("train_step", 16, "relabel_step", 16)
  for step in (train, relabel):
    assert step["fits"] and 0 < step["total_gib"] < 1  # tiny: megabytes per chip
    parts = step["argument_gib"] + step["temp_gib"] + step["output_gib"] - step["alias_gib"] + step["resident_gib"]
    assert step["total_gib"] == pytest.approx(parts)
    assert step["flops_per_chip"] > 1e8
    assert step["examples_per_s_at_mfu"] == pytest.approx(step["batch"] * 0.4 * 197e12 / step["flops_per_chip"])
  assert train["alias_gib"] > 0  # the donated state is updated in place
  assert relabel["resident_gib"] > 0  # optimizer state and momentum model beside relabelling
  assert "| configs/tiny.py | v5e:2x2 (4 chips) | 1,4,1 | none | train_step | 16 |" in run.stdout


@pytest.mark.slow
def test_a_step_that_does_not_fit_exits_2_and_says_so():
  pytest.importorskip("libtpu", reason="compiling for a TPU slice needs libtpu: pip install -e '.[tpu]'")
  run = _klip_compile("--config", "configs/tiny.py", "--topology", "v5e-1", "--global-batch", "65536",
                      "--config.momentum.enabled=False", "--search", "0")
  assert run.returncode == 2, run.stderr[-3000:]
  assert "configs/tiny.py does not fit v5e:1x1 (16 GiB HBM per chip)" in run.stderr
  assert "No alternative was compiled (--search 0)" in run.stderr
  assert "| NO |" in run.stdout


def test_a_global_batch_that_does_not_split_over_the_mesh_is_refused_before_compiling(small):
  with pytest.raises(ConfigError, match=r"--global-batch \(config.train.batch_size\)=8 does not split over the "
                                        r"mesh's data x fsdp = 3 chips; use a multiple of 3"):
    aot.compile_report(small, aot.parse_topology("v5e:2x2"), (3, 1, 1), devices=jax.devices()[:3])


@pytest.mark.parametrize("meshes,message", [
    (["data"], r"= 32 chips; use a multiple of 32"),  # 8 images over v5e-32's 32 chips
    (["8,1,1"], r"config.mesh.shape=\(8, 1, 1\) needs 8 devices, 32 are available"),
])
def test_klip_compile_checks_every_slice_before_compiling_the_first(small, monkeypatch, meshes, message):
  # v5e-8 (8 chips) takes the batch of 8; v5e-32, named second, does not: refused before the
  # first slice is described or compiled (base.py's train step compiles for ~20 minutes).
  monkeypatch.setattr(aot, "tpu_devices", lambda topology: pytest.fail(f"{topology.name} described"))
  with pytest.raises(ConfigError, match=message):
    aot.compile_all(small, "small", ["v5e-8", "v5e-32"], meshes)


@pytest.fixture
def fake_compile(monkeypatch):
  """compile_report stubbed: the train step fits (10 GiB of 16) only with full remat under full
  FSDP; every call is recorded. The train state's bytes per chip: 1 GiB, or what `state_gib`
  says for a mesh shape."""
  calls, state_gib = [], {}

  def compile_report(config, topology, mesh_shape, *, name, devices, steps):
    remat = config.model.vision.remat
    calls.append((mesh_shape, remat, steps))
    train = _step(total_gib=10 if (remat, mesh_shape) == ("full", (1, 8, 1)) else 20)
    relabel = [] if steps == ("train",) else [_step("relabel_step", total_gib=1)]
    return aot.Report(name, topology, "TPU v5 lite", mesh_shape, remat, [train, *relabel])

  monkeypatch.setattr(aot, "compile_report", compile_report)
  monkeypatch.setattr(aot.inputs, "abstract_state",
                      lambda config, vocab, mesh: (None,) * 4 + (tuple(mesh.shape.values()),))
  monkeypatch.setattr(aot, "chip_bytes", lambda shape: state_gib.get(shape, 1) * GIB)
  return calls, state_gib


def test_search_compiles_alternatives_in_order_until_one_fits(small, fake_compile):
  calls, _ = fake_compile
  failed = _report([_step(total_gib=20), _step("relabel_step", total_gib=1)], mesh=(8, 1, 1), topology="v5e:2x4")
  found, tried = aot.search(small, failed, 10, jax.devices()[:8])
  assert [(m, r) for m, r, _ in tried] == aot.alternatives(small, (8, 1, 1))
  assert [outcome for *_, outcome in tried] == ["does not fit"] * 6 + ["fits"]
  assert (found.mesh, found.remat, found.fits) == ((1, 8, 1), "full", True)
  # A remat change on the same mesh recompiles the train step only and keeps the relabel step's report.
  assert [steps for *_, steps in calls] == [("train",)] * 3 + [("train", "relabel")] * 4
  assert [s.step for s in found.steps] == ["train_step", "relabel_step"]
  calls.clear()
  assert aot.search(small, failed, 2, jax.devices()[:8]) == (None, [((8, 1, 1), "dots", "does not fit"),
                                                                    ((8, 1, 1), "dots_no_batch", "does not fit")])
  assert len(calls) == 2


def test_search_skips_without_compiling_a_mesh_whose_state_alone_exceeds_the_hbm(small, fake_compile):
  calls, state_gib = fake_compile
  state_gib[(1, 8, 1)] = 17  # (contrived: a mesh whose state does not fit 16 GiB)
  failed = _report([_step(total_gib=20), _step("relabel_step", total_gib=1)], mesh=(8, 1, 1), topology="v5e:2x4")
  found, tried = aot.search(small, failed, 10, jax.devices()[:8])
  assert [outcome for *_, outcome in tried] == ["does not fit"] * 3 + ["skipped"] * 4
  assert found is None and [mesh for mesh, *_ in calls] == [(8, 1, 1)] * 3


def test_search_leaves_remat_alone_when_only_the_relabel_step_does_not_fit(small, fake_compile):
  calls, _ = fake_compile
  failed = _report([_step(total_gib=10), _step("relabel_step", total_gib=20)], mesh=(8, 1, 1), topology="v5e:2x4")
  aot.search(small, failed, 1, jax.devices()[:8])
  assert calls == [((1, 8, 1), "none", ("train", "relabel"))]


def test_search_shards_the_state_first_when_it_takes_over_half_the_hbm(small, fake_compile):
  _, state_gib = fake_compile
  state_gib[(8, 1, 1)] = 9  # of 16 GiB: no remat policy makes room
  failed = _report([_step(total_gib=20), _step("relabel_step", total_gib=1)], mesh=(8, 1, 1), topology="v5e:2x4")
  found, tried = aot.search(small, failed, 10, jax.devices()[:8])
  assert [(m, r) for m, r, _ in tried] == [((1, 8, 1), "none"), ((1, 8, 1), "dots"), ((1, 8, 1), "dots_no_batch"),
                                          ((1, 8, 1), "full")]
  assert (found.mesh, found.remat) == ((1, 8, 1), "full")
