"""The benchmark's comparison is like for like: transformers' BLIP built at our sizes has our
parameter count and, given our weights, computes what we compute (its relabelling, written
independently in PyTorch, flags and rewrites the same captions); the compilation counter sees a
deliberate recompilation; MFU and peaks are the datasheet arithmetic."""

import json

import jax
import numpy as np
import pytest

from klip_jax import cli, compilations
from klip_jax import config as config_lib
from klip_jax.bench import hf_blip, inputs, peak, timing
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import relabel
from klip_jax.train import state as state_lib
from klip_jax.train import step as step_lib

torch = pytest.importorskip(
    "torch", reason="the comparison is with PyTorch BLIP: install the test or export extra (torch==2.13.0)")
VOCAB = 300
pytestmark = pytest.mark.xdist_group("bench_models")  # the module's tests share the models it builds


@pytest.fixture(scope="module")
def tiny():
  c = config_lib.load("configs/tiny.py")
  c.momentum.enabled = False
  c.train.batch_size = 8
  c.data.max_len = c.model.text.max_len = 40
  c.scio.update(rule="paper", field_calibration=False, candidates=False, max_fill=6)
  return c


@pytest.fixture(scope="module")
def model(tiny):
  return inputs.fresh_model(tiny, VOCAB)


def test_hf_model_has_our_parameter_count(tiny, model):
  _, _, state, *_ = model
  ours = sum(int(x.size) for x in jax.tree.leaves(state.params))
  module = hf_blip.build(tiny.model, VOCAB, inputs.token_ids(VOCAB))
  assert hf_blip.parameter_count(module) == ours
  wider = tiny.copy_and_resolve_references()
  wider.model.vision.update(width=96, heads=3, mlp_dim=200, depth=3)
  wider.model.text.update(width=48, heads=4, mlp_dim=100, depth=1)
  mesh, *_ = model
  tx, _ = state_lib.make_optimizer(wider.optim, wider.train.steps)
  _, abstract, _ = state_lib.abstract_state(wider, VOCAB, tx, mesh)
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  assert hf_blip.parameter_count(hf_blip.build(wider.model, VOCAB, inputs.token_ids(VOCAB))) == ours


def test_hf_relabelling_flags_and_rewrites_what_ours_does(tiny, model):
  mesh, graph, state, shardings, _, _ = model
  tokens = inputs.token_ids(VOCAB)
  batch = inputs.random_batch(tiny, VOCAB, seed=3, batch_size=8)
  with mesh_lib.logical_context(mesh, tiny.mesh.rules):
    step = relabel.make_relabel_step(tiny, graph, tokens, shardings.params, mesh)
    ours = step(state.params, step_lib.model_inputs(batch), jax.random.key(0))
  module = hf_blip.build(tiny.model, VOCAB, tokens)
  hf_blip.load_params(module, jax.device_get(state.params.to_pure_dict()), tiny.model)
  flagged, corrected = hf_blip.relabeller(module, tokens, max_clauses=tiny.scio.max_clauses,
                                          max_fill=tiny.scio.max_fill)(batch)
  assert (flagged >= 0).any()  # the comparison exercises proofreading
  np.testing.assert_array_equal(flagged, np.asarray(ours.flagged)[:, 0])  # one flag, as the paper
  np.testing.assert_array_equal(corrected, np.asarray(ours.corrected_ids))


def test_the_benchmark_batch_has_the_clause_structure_scio_reads(tiny):
  batch = inputs.random_batch(tiny, VOCAB, batch_size=2)
  tokens = inputs.token_ids(VOCAB)
  ids, clause_ids, kw = batch["text_ids"][0], batch["clause_ids"][0], batch["keyword_mask"][0]
  clauses = clause_ids.max() + 1
  assert clauses >= 2 and ids[0] == tokens.cls
  assert (ids == tokens.separator).sum() == clauses - 1 and (ids == tokens.sep).sum() == 1
  for k in range(clauses):
    assert kw[clause_ids == k].sum() == 2  # every clause has its keyword
  assert (kw[clause_ids < 0] == 0).all()


def test_compilation_counter_sees_a_deliberate_recompilation():
  def train_step(x):
    return x * 2

  step = jax.jit(train_step)
  with compilations.Counter() as counter:
    step(np.ones(3, np.float32))
    step(np.ones(3, np.float32))
    assert counter.by_name[step_lib.JIT_NAME] == 1  # the name the train loop's log counts
    step(np.ones(4, np.float32))  # a new shape: a new program
  assert counter.by_name[step_lib.JIT_NAME] == 2
  step(np.ones(5, np.float32))
  assert counter.by_name[step_lib.JIT_NAME] == 2  # no longer listening


def test_peaks_and_mfu_are_the_datasheet_arithmetic():
  assert peak.device_peak_tflops("TPU v5 lite") == 197.0
  assert peak.device_peak_tflops("TPU v5p") == 459.0
  assert peak.device_peak_tflops("TPU v4") == 275.0
  assert peak.device_peak_tflops("TPU v6 lite") == 918.0
  assert peak.device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert peak.device_peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
  assert peak.device_peak_tflops("cpu") is None
  # 1e15 FLOP in 2 s on 4 chips of 250 TFLOP/s: 1.25e14 FLOP/s per chip, half the peak.
  assert peak.mfu(1e15, 2.0, 4, 250.0) == pytest.approx(0.5)
  assert peak.mfu(1e15, 2.0, 4, None) is None


def test_interleaved_timing_reports_the_median_round(monkeypatch):
  clock = iter([0, 1, 1, 4, 4, 6, 6, 7, 7, 17, 17, 18])  # a: 1, 2, 10 s; b: 3, 1, 1 s
  monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
  calls = []
  seconds = timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               rounds=3, warmup=1)
  assert seconds == {"a": 2, "b": 1}
  assert calls == ["a", "b"] * 4  # warm-up, then the contenders take turns


@pytest.mark.slow
def test_bench_command_compares_with_hf_in_one_run(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert cli.main(["bench", "train", "relabel", "caption", "--compare-hf", "--rounds", "1",
                   "--vocab-size", "300", "--config.train.batch_size=8", "--config.scio.relabel_batch_size=8",
                   "--json", str(out), "--profile", str(tmp_path / "trace")]) == 0
  results = json.loads(out.read_text())
  assert results["train"]["hf"]["params"] == results["train"]["config"]["params"]
  assert results["train"]["klip_jax"]["compilations_steady_state"] == 0
  assert results["train"]["klip_jax"]["flops_per_step"] > 0
  ops = results["train"]["profile"]["top_ops"]
  assert ops and all(o["ms_per_step"] > 0 for o in ops) and sum(o["share"] for o in ops) <= 1 + 1e-9
  assert results["relabel"]["flags_agree"] == 1.0
  for mode in ("greedy", "beam"):
    assert results["caption"][mode]["ratio"] > 0
  # The encoding's split of a greedy call, from the same medians: one round on a loaded machine
  # can time the encoding alone above the whole call, so the arithmetic is checked, not the order.
  encoding, greedy = results["caption"]["image_encoding"], results["caption"]["greedy"]
  ours_greedy_s, hf_greedy_s = 8 / greedy["klip_jax_captions_per_s"], 8 / greedy["hf_captions_per_s"]
  assert encoding["klip_jax_s"] > 0 and encoding["hf_s"] > 0
  assert encoding["klip_jax_share_of_greedy"] == pytest.approx(encoding["klip_jax_s"] / ours_greedy_s)
  assert encoding["greedy_ratio_bound"] == pytest.approx(hf_greedy_s / encoding["klip_jax_s"])
  assert encoding["greedy_decoding_ratio"] == pytest.approx(
      (hf_greedy_s - encoding["hf_s"]) / (ours_greedy_s - encoding["klip_jax_s"]))
  assert "| train step | images/s |" in capsys.readouterr().out
