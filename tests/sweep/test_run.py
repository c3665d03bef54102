"""`klip sweep run`: points and their configs, parameter counts, FLOPs, the sweep.jsonl line, nested
data subsets, and (slow) a killed sweep that resumes without retraining its finished point."""

import dataclasses
import hashlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from klip_jax import config as config_lib
from klip_jax.data import builder, pipeline, prepare, records
from klip_jax.data import tokenizer as tokenizer_lib
from klip_jax.data.records import true_text
from klip_jax.data.tokenizer import TextCodec
from klip_jax.errors import ConfigError, Preempted, TokenizerError
from klip_jax.eval import heldout
from klip_jax.eval.truth import load_split
from klip_jax.jobs import sweep
from klip_jax.model import size
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import checkpoint
from klip_jax.train import state as state_lib
from tests.conftest import TINY_SETTINGS
from tests.xla import klip_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MICRO = os.path.join(ROOT, "configs", "sweeps", "micro.py")


def _micro(variant=""):
  return config_lib.load(MICRO + (f":{variant}" if variant else ""))


def _hand_count(c, vocab: int) -> tuple[int, int]:
  """(total, non-embedding) parameters of KLIP, counted by hand from the architecture: a pre-LN
  ViT (fused qkv) and a BERT text tower whose layers hold self-, causal self- and cross-attention
  (keys/values from the image width), with a tied LM head."""
  v, t, e = c.model.vision, c.model.text, c.model.embed_dim
  dense = lambda i, o: i * o + o
  ln = lambda w: 2 * w
  patches = (v.image_size // v.patch_size) ** 2
  vision_block = ln(v.width) + dense(v.width, 3 * v.width) + dense(v.width, v.width) + ln(v.width) \
      + dense(v.width, v.mlp_dim) + dense(v.mlp_dim, v.width)
  vision_embeddings = v.width + (1 + patches) * v.width  # class token, position embeddings
  vision = dense(v.patch_size ** 2, v.width) + vision_embeddings + v.depth * vision_block + ln(v.width)
  attention = lambda kv: dense(t.width, t.width) + 2 * dense(kv, t.width) + dense(t.width, t.width) + ln(t.width)
  text_layer = 2 * attention(t.width) + attention(v.width) + dense(t.width, t.mlp_dim) + dense(t.mlp_dim, t.width) \
      + ln(t.width)
  text_embeddings = vocab * t.width + t.max_len * t.width
  text = text_embeddings + ln(t.width) + t.depth * text_layer + dense(t.width, t.width) + ln(t.width) + vocab
  heads = dense(v.width, e) + dense(t.width, e) + dense(t.width, 2) + 1  # projections, ITM head, temperature
  total = vision + text + heads
  return total, total - vision_embeddings - text_embeddings


@pytest.mark.parametrize("model", ["m0", "m2"])
def test_parameter_counts_match_a_hand_count(model):
  s = _micro()
  c = sweep.point_config(s, sweep.Point(model, 128, 300, False, 0.2))
  c.model.text.max_len = 160  # text and image position tables of different lengths
  tx, _ = state_lib.make_optimizer(c.optim, 10)
  _, abstract, _ = state_lib.abstract_state(c, 1000, tx, mesh_lib.from_config(c.mesh))
  total, non_embedding = _hand_count(c, 1000)
  assert size.parameter_counts(abstract.params) == {"total": total, "non_embedding": non_embedding}


def test_6nd_counts_patches_and_text_tokens_of_the_global_batch():
  c = _micro().base  # 32 px chips, 8 px patches: 16 patches; 128 text tokens; batch 16
  assert sweep.flops_6nd(1000, c) == 6 * 1000 * (16 + 128) * 16


def test_micro_sees_each_chip_once():
  """micro.py's points: 3 sizes x 3 data sizes, each trained for one pass over its chips."""
  named = sweep.points(_micro())
  assert len(named) == 9 and {p.model for p in named.values()} == {"m0", "m1", "m2"}
  assert {p.train_chips for p in named.values()} == {1200, 2400, 4800}
  batch = _micro().base.train.batch_size
  assert all(p.train_chips == p.steps * batch for p in named.values())


def test_points_of_the_micro_grid_and_their_configs():
  s = _micro("repeat")
  named = sweep.points(s)
  assert len(named) == 9 and list(named)[:2] == ["m0_d128_s300", "m0_d256_s300"]
  assert {p.model for p in named.values()} == {"m0", "m1", "m2"}
  assert {p.train_chips for p in named.values()} == {128, 256, 512}
  c = sweep.point_config(s, named["m2_d256_s300"])
  for tower in (c.model.vision, c.model.text):
    assert (tower.width, tower.depth, tower.heads, tower.mlp_dim) == (96, 3, 3, 192)
  assert c.data.train_examples == 256 and c.train.steps == 300
  assert tuple(c.eval.at_steps) == (19, 38, 75, 150, 300)
  assert c.scio.stage_a_steps == c.scio.stage_b_steps == c.scio.stage_c_steps == 0
  scio = sweep.point_config(s, sweep.Point("m0", 128, 300, True, 0.3))
  assert (scio.scio.stage_a_steps, scio.scio.stage_b_steps, scio.scio.stage_c_steps) == (200, 50, 50)
  assert scio.data.synth.noise_rate == 0.3
  s.grid.noise = [0.1, 0.3]
  s.grid.scio = [False, True]
  assert "m1_d512_s300_scio_n0.3" in sweep.points(s)
  s.points = [{"model": "m9", "train_chips": 1, "steps": 1}]
  with pytest.raises(ConfigError, match="no model 'm9'"):
    sweep.points(s)


@pytest.mark.parametrize("axis,value,match", [
    ("train_chips", 1200.5, r"train_chips=1200.5; give a whole number of chips > 0"),  # int() made it 1200
    ("train_chips", "1200", r"train_chips='1200'; give a whole number"),
    ("train_chips", 0, r"train_chips=0; give a whole number of chips > 0"),  # 0 reads the whole split
    ("steps", 0, r"steps=0; give a whole number of steps > 0"),
    ("scio", "no", r"scio='no'; give True or False"),  # bool("no") is True: a SCIO point
    ("noise", "0.2", r"noise='0.2'; give a caption noise rate in \[0, 1\]"),
    ("noise", 1.5, r"noise=1.5; give a caption noise rate"),
])
def test_a_point_value_that_would_train_another_point_is_refused(axis, value, match):
  s = _micro()
  s.points = [{"model": "m0", "train_chips": 1200, "steps": 75, "scio": False, axis: value}]
  with pytest.raises(ConfigError, match=match):
    sweep.points(s)


@pytest.mark.parametrize("grid,match", [
    ({"model": "m0", "train_chips": [128], "steps": [300]}, r"sweep.grid.model='m0': give a list"),
    ({"model": ["m0"], "train_chips": 128, "steps": [300]}, r"sweep.grid.train_chips=128: give a list"),
])
def test_a_grid_axis_that_is_not_a_list_is_named(grid, match):
  s = _micro("repeat")
  s.grid = grid
  with pytest.raises(ConfigError, match=match):
    sweep.points(s)


def test_head_dim_zero_is_named():
  s = _micro()
  s.head_dim = 0
  with pytest.raises(ConfigError, match=r"head_dim=0 \(a whole number > 0\)"):
    sweep.points(s)


def test_a_model_may_carry_its_own_init_and_learning_rate():
  s = _micro()
  s.models = {"a": {"width": 64, "depth": 1, "init_std": 0.03, "lr": 5e-4}, "b": {"width": 64, "depth": 1}}
  a, b = (sweep.point_config(s, sweep.Point(m, 128, 300, False, 0.2)) for m in ("a", "b"))
  assert (a.model.vision.init_std, a.model.text.init_std, a.optim.lr) == (0.03, 0.03, 5e-4)
  assert (b.model.vision.init_std, b.model.text.init_std, b.optim.lr) == (
      s.base.model.vision.init_std, s.base.model.text.init_std, s.base.optim.lr)
  s.models = {"a": {"width": 64, "depth": 1, "dropout": 0.1}}
  with pytest.raises(ConfigError, match=r"sweep.models.a .*width and depth, and optionally init_std and lr"):
    sweep.points(s)


def test_config_hash_is_stable_and_ignores_only_data_locations(tmp_path):
  s, point = _micro(), sweep.Point("m1", 256, 300, False, 0.2)
  a = sweep.point_config(s, point, "/here/world", "/here/tok.model")
  b = sweep.point_config(_micro(), point, "/elsewhere/world", "")
  assert sweep._hash(a) == sweep._hash(b)
  assert len(sweep._hash(a)) == 64 and int(sweep._hash(a), 16) >= 0
  (tmp_path / "config.json").write_text(a.to_json_best_effort(indent=2))  # as the training loop saves it
  assert sweep.config_hash(json.loads((tmp_path / "config.json").read_text())) == sweep._hash(a)
  b.train.steps = 301
  assert sweep._hash(b) != sweep._hash(a)


def test_launch_commands_reproduce_each_point_config():
  s = _micro("repeat")
  commands = sweep.launch_commands(s, "/mnt/shared/sw", tpu_name="klip", zone="us-west4-a",
                                   launch_args="--project p", only=["m2_d512_s300"])
  assert len(commands) == 1
  args = shlex.split(commands[0])
  assert args[:11] == ["launch/tpu_vm.sh", "run", "--name", "klip-m2-d512-s300", "--zone", "us-west4-a",
                       "--project", "p", "--config", "configs/tiny.py:32px", "--workdir"]
  assert args[11] == "/mnt/shared/sw/points/m2_d512_s300" and args[12] == "--"
  # The base config file with the printed overrides is the point's config.
  launched = config_lib.load(os.path.join(ROOT, "configs", "tiny.py:32px"), args[13:])
  assert sweep._hash(launched) == sweep._hash(sweep.point_config(s, sweep.points(s)["m2_d512_s300"]))
  with pytest.raises(ConfigError, match="no such point"):
    sweep.launch_commands(s, "/w", tpu_name="k", zone="z", only=["m7_d1_s1"])


def test_launched_slices_of_several_noise_rates_read_the_sweeps_tokenizer():
  # Each slice trained a tokenizer on its own world, so the slices of the second noise rate
  # trained on another tokenizer than the sweep's (trained on the first point's world).
  s = _micro("repeat")
  s.grid = {"model": ["m0"], "train_chips": [32], "steps": [6], "noise": [0.0, 0.2]}
  with pytest.raises(ConfigError, match=r"several noise rates.*--config\.base\.data\.tokenizer="):
    sweep.launch_commands(s, "/w", tpu_name="k", zone="z")
  s.base.data.tokenizer = "gs://b/sw/tokenizer.model"
  commands = [shlex.split(c) for c in sweep.launch_commands(s, "gs://b/sw", tpu_name="k", zone="z")]
  assert len(commands) == 2 and all(c[-1] == "--config.data.tokenizer=gs://b/sw/tokenizer.model" for c in commands)


def test_cli_emits_one_launch_command_per_point_and_names_unknown_points(capsys):
  from klip_jax import cli

  assert cli.main(["sweep", "run", "--config", MICRO, "--workdir", "/w", "--emit-launch", "--zone", "z"]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert len(printed) == 9 and all(line.startswith("launch/tpu_vm.sh run --name klip-sweep-m") for line in printed)
  assert cli.main(["sweep", "run", "--config", MICRO, "--workdir", "/w", "--points", "m0_d1200_s75,m5"]) == 2
  assert "--points m5: no such point" in capsys.readouterr().err
  assert cli.main(["sweep", "run", "--config", MICRO, "--workdir", "/w", "--emit-launch"]) == 2
  assert "--emit-launch needs --zone" in capsys.readouterr().err


def test_line_follows_the_schema():
  s = _micro()
  p = sweep.Point("m1", 256, 300, False, 0.2)
  c = sweep.point_config(s, p)
  held = lambda x: {"itc": x, "itm": 0.5, "reconstruction": 2.0, "total": x + 2.5, "examples": 64}
  chance = (1 + 5 + 10) / (3 * 64)  # R@1, R@5, R@10 of a random ranking of 64 val chips, averaged
  metrics = [{"step": 50, "loss": 9.0, "images_per_s": 100.0},
             {"step": 150, "eval": {"heldout_loss": held(1.5), "retrieval": {"r_mean": 0.2, "chance_r_mean": chance}}},
             {"step": 300, "eval": {"heldout_loss": held(1.0), "retrieval": {"r_mean": 0.4, "chance_r_mean": chance}}}]
  data = {"tokenizer": {"pieces": 1000, "sha256": "ab"}, "dataset": {"sha256": "cd"}}
  entry = sweep.line("m1_d256_s300", p, c, data=data, params={"total": 10, "non_embedding": 7}, flops_per_step=2.0,
                     metrics=metrics, wall_s=12.5)
  assert list(entry) == ["point", "status", "error", "config_hash", "data", "model", "params", "train_chips", "steps",
                         "batch_size", "tokens_per_image", "flops_per_step", "flops_6nd_per_step", "scio", "noise",
                         "evals", "r_mean", "r_mean_chance", "wall_s"]
  assert entry["status"] == "done" and entry["error"] is None and entry["config_hash"] == sweep._hash(c)
  assert entry["data"] == data
  assert (entry["train_chips"], entry["steps"], entry["batch_size"], entry["tokens_per_image"]) == (256, 300, 16, 128)
  assert entry["flops_6nd_per_step"] == 6 * 7 * (16 + 128) * 16
  assert entry["evals"] == [
      {"step": 150, "images_seen": 2400, "flops": 300.0,
       "loss": {"itc": 1.5, "itm": 0.5, "reconstruction": 2.0, "total": 4.0}},
      {"step": 300, "images_seen": 4800, "flops": 600.0,
       "loss": {"itc": 1.0, "itm": 0.5, "reconstruction": 2.0, "total": 3.5}}]
  assert entry["r_mean"] == 0.4 and entry["r_mean_chance"] == pytest.approx(1 / 12) and entry["wall_s"] == 12.5
  assert sweep._row("m1_d256_s300", entry, "done").split()[5:7] == ["0.400", "0.083"]  # r_mean beside its chance
  json.dumps(entry, allow_nan=False)
  failed = sweep.line("m1_d256_s300", p, c, data=data, params=None, flops_per_step=None, metrics=[], wall_s=1.0,
                      error="ConfigError: bad")
  assert failed["status"] == "failed" and failed["error"] == "ConfigError: bad" and failed["evals"] == []


def test_train_examples_limit_the_train_split_to_its_first_chips(tiny_data, tiny_tokenizer):
  codec = TextCodec(tiny_tokenizer, 128)
  options = pipeline.PipelineOptions(tiny_data, "train", 8, seed=1, limit=16)  # of 48 train chips
  it = iter(pipeline.build(options, codec))
  seen = np.concatenate([next(it)["index"] for _ in range(6)])  # three epochs of 16
  assert sorted(seen.tolist()) == sorted(list(range(16)) * 3)
  with pytest.raises(ConfigError, match="49 train examples asked.*has 48"):
    pipeline.build(pipeline.PipelineOptions(tiny_data, "train", 8, limit=49), codec)


@pytest.mark.parametrize("field,value,match", [
    ("data.train_examples", 4801, "data.train_examples: 4801 chips asked.*num_train=4800"),
    ("eval.at_steps", (0, 300), "eval.at_steps"),
    ("eval.periodic_examples", 8, "eval.periodic_examples: 8 val examples are less than one batch"),
])
def test_sweep_fields_are_validated_before_any_work(field, value, match):
  c = sweep.point_config(_micro(), sweep.Point("m0", 128, 300, False, 0.2))
  config_lib.validate(c)
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(c)


def test_a_named_tokenizer_that_does_not_exist_stops_the_sweep_before_any_work(tmp_path):
  s = _micro()
  s.base.data.tokenizer = str(tmp_path / "typo" / "tokenizr.model")
  with pytest.raises(TokenizerError, match="tokenizr.model: no such file"):
    sweep.run(s, str(tmp_path / "sweep"), progress=False, out=io.StringIO())
  assert not os.path.exists(tmp_path / "typo") and not os.path.exists(tmp_path / "sweep")  # no tokenizer, no world


def test_heldout_batches_are_whole_batches_of_true_captions(tiny_data, tiny_tokenizer):
  codec = TextCodec(tiny_tokenizer, 128)
  split = load_split(tiny_data, "val", codec)  # 12 chips, some captions corrupted
  batches = heldout.batches(split, codec, 5)
  assert len(batches) == 2 and all(len(b["text_ids"]) == 5 for b in batches)  # 2 left out
  for i in range(10):
    _, caption, spans = true_text(split.records[i])
    expected = codec.encode(caption, spans)
    b = batches[i // 5]
    np.testing.assert_array_equal(b["text_ids"][i % 5], expected.ids)
    np.testing.assert_array_equal(b["keyword_mask"][i % 5], expected.keyword_mask)
    np.testing.assert_array_equal(b["image"][i % 5], split.images[i])
  with pytest.raises(ConfigError, match="at least one batch"):
    heldout.batches(split, codec, 13)


def _fake_training(monkeypatch, tokenizer_path: str, data_dir: str, fail: dict | None = None) -> list[int]:
  """Training replaced by a fake that writes what training leaves (config.json, the data
  fingerprint, a metrics log with the final held-out loss) or raises fail[train_chips]; the
  sweep's world and tokenizer by `data_dir` and `tokenizer_path`. Returns the train_chips of the
  points trained, in order."""
  trained, fail = [], {} if fail is None else fail

  def fake_train(c, run_dir, progress):
    trained.append(c.data.train_examples)
    if c.data.train_examples in fail:
      raise fail[c.data.train_examples]
    os.makedirs(run_dir, exist_ok=True)
    open(os.path.join(run_dir, "config.json"), "w").write(c.to_json_best_effort(indent=2))
    codec = TextCodec(c.data.tokenizer, c.data.max_len)
    checkpoint.record_data(run_dir, prepare.fingerprint(prepare.RunData(c.data.data_dir, codec)))
    held = {"itc": 1.0, "itm": 0.6, "reconstruction": 2.0, "total": 3.6}
    open(os.path.join(run_dir, "metrics.jsonl"), "w").write(
        json.dumps({"step": c.train.steps, "eval": {"heldout_loss": held}}) + "\n")

  monkeypatch.setattr(sweep, "_world", lambda *_: data_dir)
  monkeypatch.setattr(sweep, "_tokenizer", lambda *_: tokenizer_path)
  monkeypatch.setattr(sweep._Sizes, "__call__", lambda self, c: ({"total": 2, "non_embedding": 1}, 5.0))
  monkeypatch.setattr(sweep.train_job, "train", fake_train)
  return trained


def test_rerun_skips_done_retries_failed_reruns_changed_and_lets_preemption_through(
    tiny_data, tiny_tokenizer, tmp_path, monkeypatch):
  """The runner's bookkeeping, training faked (`_fake_training`)."""
  workdir, fail = str(tmp_path), {32: RuntimeError("boom"), 64: Preempted(3)}
  trained = _fake_training(monkeypatch, tiny_tokenizer, tiny_data, fail)
  s = _micro("test")  # points d32, d1000, d64
  with pytest.raises(Preempted):
    sweep.run(s, workdir, progress=False, out=io.StringIO())
  assert trained == [32, 1000, 64]
  lines = sweep.read_lines(workdir)
  assert set(lines) == {"m0_d32_s6", "m0_d1000_s6"}  # the preempted point is not recorded
  assert lines["m0_d32_s6"]["status"] == "failed" and lines["m0_d32_s6"]["error"] == "RuntimeError: boom"
  assert lines["m0_d1000_s6"]["status"] == "done" and lines["m0_d1000_s6"]["evals"][0]["flops"] == 30.0

  fail.clear()
  trained.clear()
  out = io.StringIO()
  sweep.run(s, workdir, progress=False, out=out)
  assert trained == [32, 64]  # the failed point retried, the done one skipped
  assert "skipped (done)" in out.getvalue()
  assert all(line["status"] == "done" for line in sweep.read_lines(workdir).values())

  s.base.optim.lr = 1e-3  # every point's config changes: rerun, old workdirs removed first
  trained.clear()
  out = io.StringIO()
  sweep.run(s, workdir, progress=False, out=out)
  assert trained == [32, 1000, 64]
  assert out.getvalue().count("config changed") == 3 and out.getvalue().count("starting it afresh") == 3
  assert len(open(os.path.join(workdir, "sweep.jsonl")).readlines()) == 7


def test_another_dataset_or_tokenizer_reruns_the_points_it_would_have_skipped(
    tiny_data, tiny_tokenizer, tmp_path, monkeypatch):
  """The config hash leaves the data's location out (a run trained elsewhere on the same world
  hashes the same), so a dataset or tokenizer swapped under the same config must be told apart
  by what it holds: a point done on the old data is retrained, not skipped with the old losses."""
  other_data = str(tmp_path / "other_world")  # the same sizes, another world
  builder.build(other_data, dataclasses.replace(TINY_SETTINGS, seed=TINY_SETTINGS.seed + 1))
  other_tokenizer = str(tmp_path / "other.model")
  source = builder.open_split(other_data, "train")
  tokenizer_lib.train_sentencepiece(
      [records.from_example(source[i], decode_rasters=False)["caption"] for i in range(len(source))], 300,
      other_tokenizer)
  workdir, s = str(tmp_path / "sweep"), _micro("test")
  trained = _fake_training(monkeypatch, tiny_tokenizer, tiny_data)
  sweep.run(s, workdir, progress=False, out=io.StringIO())
  assert trained == [32, 1000, 64]

  for data_dir, tokenizer_path in ((other_data, tiny_tokenizer), (other_data, other_tokenizer)):
    monkeypatch.undo()
    trained = _fake_training(monkeypatch, tokenizer_path, data_dir)
    out = io.StringIO()
    sweep.run(s, workdir, progress=False, out=out)
    assert trained == [32, 1000, 64], out.getvalue()
    assert out.getvalue().count("data changed") == 3 and out.getvalue().count("starting it afresh") == 3

  trained.clear()
  sweep.run(s, workdir, progress=False, out=io.StringIO())
  assert trained == []  # the same data again: skipped
  tokenizer_sha = hashlib.sha256(open(other_tokenizer, "rb").read()).hexdigest()
  assert {line["data"]["tokenizer"]["sha256"] for line in sweep.read_lines(workdir).values()} == {tokenizer_sha}


def _sweep(workdir):
  return [sys.executable, "-m", "klip_jax.cli", "sweep", "run", "--config", MICRO + ":test", "--workdir", workdir]


@pytest.mark.slow
def test_killed_sweep_resumes_without_retraining_and_records_a_failed_point(tmp_path):
  """micro.py:test: m0_d32_s6, m0_d1000_s6 (more chips than the 64-chip world has: fails),
  m0_d64_s6. SIGKILL once the first point is recorded; the rerun skips it (its checkpoints and
  log untouched), records the failure with its error and finishes the last point."""
  workdir = str(tmp_path / "sweep")
  lines = os.path.join(workdir, "sweep.jsonl")
  run = subprocess.Popen(_sweep(workdir), env=klip_env(1), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  while run.poll() is None and not (os.path.exists(lines) and '"status": "done"' in open(lines).read()):
    time.sleep(0.05)
  run.send_signal(signal.SIGKILL)
  run.wait()
  assert run.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
  first = os.path.join(workdir, "points", "m0_d32_s6")
  before = {name: os.stat(os.path.join(first, name)).st_mtime_ns for name in ("metrics.jsonl", "config.json")}
  checkpoints = sorted(os.listdir(os.path.join(first, "checkpoints")))

  out = subprocess.run(_sweep(workdir), env=klip_env(1), capture_output=True, text=True, check=True).stdout
  assert "m0_d32_s6" in out and "skipped (done)" in out.split("m0_d32_s6")[1].splitlines()[0]
  assert {name: os.stat(os.path.join(first, name)).st_mtime_ns for name in before} == before
  assert sorted(os.listdir(os.path.join(first, "checkpoints"))) == checkpoints
  recorded = sweep.read_lines(workdir)
  assert [recorded[n]["status"] for n in ("m0_d32_s6", "m0_d1000_s6", "m0_d64_s6")] == ["done", "failed", "done"]
  assert recorded["m0_d1000_s6"]["error"].startswith("ConfigError: ") and "1000" in recorded["m0_d1000_s6"]["error"]
  for name in ("m0_d32_s6", "m0_d64_s6"):
    entry = recorded[name]
    assert [e["step"] for e in entry["evals"]] == [3, 6] and entry["r_mean"] is not None
    assert all(np.isfinite(e["loss"]["total"]) for e in entry["evals"])
    assert entry["flops_per_step"] > entry["flops_6nd_per_step"] > 0
  # Same parameters, same val batches, same rng: points differ in their losses only by training.
  assert recorded["m0_d32_s6"]["evals"][-1]["loss"] != recorded["m0_d64_s6"]["evals"][-1]["loss"]


def test_a_rerun_with_another_vocabulary_size_refuses_the_sweeps_tokenizer(tiny_data, tmp_path):
  # --config.base.data.vocab_size=600 on a sweep whose W/tokenizer.model was trained for 1000
  # retrained every point (the hash changed) on the old 1000-piece tokenizer.
  s = _micro("test")
  assert sweep._tokenizer(str(tmp_path), s, tiny_data) == str(tmp_path / "tokenizer.model")
  trained_for = s.base.data.vocab_size
  s.base.data.vocab_size = trained_for - 400
  with pytest.raises(ConfigError, match=rf"trained for a vocabulary of {trained_for}, and base\.data\.vocab_size "
                                        rf"is {trained_for - 400}: set --config\.base\.data\.vocab_size={trained_for}"):
    sweep._tokenizer(str(tmp_path), s, tiny_data)
