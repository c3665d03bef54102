"""The sharded train step: 1 device == 8-device (data, fsdp, tensor) mesh, real sharding,
non-finite skipping, gradient accumulation, weight-decay mask."""

import jax
import numpy as np
import pytest
from flax import nnx

from klip_jax import config as config_lib
from klip_jax.data.tokenizer import TokenIds
from klip_jax.model.klip import KLIP, clamp_temperature
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import state as state_lib
from klip_jax.train import step as step_lib

# The module's tests share `one_and_eight` (two compiled train steps): one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("train_step")
VOCAB = 120
TOKENS = TokenIds(pad=0, cls=4, enc=5, dec=2, mask=6, sep=3, separator=7, vocab_size=VOCAB)


def _config(**optim):
  c = config_lib.load("configs/tiny.py")
  c.train.batch_size = 8
  c.momentum.queue_size = 16
  c.optim.update(**optim)
  return c


def _batch(seed=0, b=8, length=24):
  rng = np.random.default_rng(seed)
  ids = rng.integers(7, VOCAB, (b, length)).astype(np.int32)
  ids[:, 0] = TOKENS.cls
  ids[:, -3:] = TOKENS.pad
  return {"image": rng.standard_normal((b, 32, 32, 1)).astype(np.float32), "text_ids": ids,
          "keyword_mask": (rng.uniform(size=(b, length)) < 0.3).astype(np.int32),
          "clause_ids": np.where(ids == TOKENS.pad, -1, rng.integers(0, 8, (b, length))).astype(np.int32)}


def _run(config, mesh_shape, batches):
  """(final state, metrics per step, host copies of the params before and after each step)."""
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = mesh_lib.make_mesh(mesh_shape, devices)
  tx, schedule = state_lib.make_optimizer(config.optim, config.train.steps)
  graph, state, shardings = state_lib.create(config, VOCAB, tx, mesh)
  metrics, params = [], [jax.device_get(state.params)]
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    step = step_lib.make_train_step(config, graph, tx, schedule, TOKENS, shardings, mesh)
    for i, batch in enumerate(batches):
      state, m = step(state, batch, jax.random.key(i))
      metrics.append(jax.device_get(m))
      params.append(jax.device_get(state.params))
  return state, metrics, params


def _nan_batch():
  bad = _batch(2)
  bad["image"][0, 0, 0, 0] = np.nan
  return bad


@pytest.fixture(scope="module")
def one_and_eight():
  config = _config()
  batches = [_batch(0), _nan_batch(), _batch(1)]
  return _run(config, (1, 1, 1), batches), _run(config, (2, 2, 2), batches)


def _assert_trees_close(a, b, atol):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(y, x, atol=atol, rtol=atol)


@pytest.mark.slow  # a parity / end-to-end run: the full suite's tier
def test_eight_device_mesh_equals_one_device(one_and_eight):
  (state1, metrics1, params1), (state8, metrics8, params8) = one_and_eight
  for m1, m8 in zip(metrics1, metrics8):
    for key in ("loss", "loss_itc", "loss_itm", "loss_recon", "grad_norm"):
      np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-5, err_msg=key)
  for p1, p8 in zip(params1, params8):
    _assert_trees_close(p1, p8, 1e-5)
  np.testing.assert_allclose(jax.device_get(state8.image_queue), jax.device_get(state1.image_queue), atol=1e-5)


def test_non_finite_loss_skips_the_update_and_is_counted(one_and_eight):
  (state1, metrics, params), _ = one_and_eight
  assert metrics[0]["nonfinite"] == 0.0
  assert metrics[1]["nonfinite"] == 1.0 and metrics[1]["skipped"] == 1.0
  _assert_trees_close(params[1], params[2], 0.0)  # the NaN batch changed nothing
  assert metrics[2]["nonfinite"] == 0.0 and metrics[2]["skipped"] == 1.0
  assert int(state1.step) == 3 and int(state1.skipped) == 1


def test_params_are_sharded_as_the_rules_say(one_and_eight):
  _, (state8, _, _) = one_and_eight
  P = jax.sharding.PartitionSpec
  params = state8.params
  fc1 = params["text"]["layers"][0]["fc1"]["kernel"][...]
  assert fc1.sharding.spec == P("fsdp", "tensor")  # (embed, mlp)
  assert {s.data.shape for s in fc1.addressable_shards} == {(32, 64)}  # 64x128 split 2 x 2
  qkv = params["vision"]["blocks"][0]["attn"]["qkv"]["kernel"][...]
  assert qkv.sharding.spec == P("fsdp", None, "tensor")  # (embed, -, heads)
  word = params["text"]["word_embed"]["embedding"][...]
  assert word.sharding.spec == P("tensor", "fsdp")  # (vocab, embed)
  norm = params["text"]["embed_norm"]["scale"][...]
  assert norm.sharding.spec == P(None) and norm.sharding.is_fully_replicated
  mu = state8.opt_state[1][0].mu["text"]["layers"][0]["fc1"]["kernel"][...]
  assert mu.sharding.spec == P("fsdp", "tensor")  # optimizer state follows its parameter


@pytest.mark.slow  # a parity run: accumulated == one big batch
def test_gradient_accumulation_updates_every_k_steps():
  # Updates land on micro-steps 2 and 4; the first one runs at warmup's lr of 0.
  _, _, params = _run(_config(grad_accum=2), (1, 1, 1), [_batch(i) for i in range(4)])
  leaf = lambda p: np.asarray(p["itm_head"]["kernel"])
  np.testing.assert_array_equal(leaf(params[0]), leaf(params[2]))
  np.testing.assert_array_equal(leaf(params[3]), leaf(params[2]))
  assert np.abs(leaf(params[4]) - leaf(params[3])).max() > 0


def test_weight_decay_only_on_kernels():
  config = _config()
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  tx, _ = state_lib.make_optimizer(config.optim, 10)
  _, state, _ = state_lib.create(config, VOCAB, tx, mesh)
  mask = state_lib.decay_mask(state.params)
  value = lambda variable: variable.get_value()
  assert value(mask["text"]["layers"][0]["fc1"]["kernel"]) is True
  assert value(mask["vision"]["blocks"][0]["attn"]["qkv"]["kernel"]) is True
  assert value(mask["text"]["layers"][0]["fc1"]["bias"]) is False
  assert value(mask["text"]["word_embed"]["embedding"]) is False
  assert value(mask["vision"]["pos_embed"]) is False and value(mask["temp"]) is False
  assert value(mask["vision"]["norm"]["scale"]) is False


def test_temperature_recovers_after_an_update_pushed_it_out_of_range():
  """BLIP clamps the temperature parameter after each update; clipping inside the forward pass
  would leave a parameter below the range with zero gradient for good."""
  config = _config(lr=1e-2, warmup_steps=1)
  config.model.temp_range = (0.05, 0.5)
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  tx, schedule = state_lib.make_optimizer(config.optim, config.train.steps)
  graph, state, shardings = state_lib.create(config, VOCAB, tx, mesh)
  # As if an overshooting update had left it at 0.001 (a range of one value sets it there).
  state = state.replace(params=clamp_temperature(state.params, (0.001, 0.001)))
  temps = []
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    step = step_lib.make_train_step(config, graph, tx, schedule, TOKENS, shardings, mesh)
    for i in range(5):
      state, _ = step(state, _batch(i), jax.random.key(i))
      temps.append(float(jax.device_get(state.params["temp"][...])))
  assert temps[0] == pytest.approx(0.05)  # clamped back into the range at once
  assert temps[-1] > 0.05 + 1e-3, temps  # and learning again: random features push it up
  assert all(0.05 <= t <= 0.5 for t in temps)


@pytest.mark.parametrize("clause_negatives", [False, True])
def test_itm_pairs_are_the_positives_then_each_kind_of_negative(clause_negatives):
  """Each ITM row scores the pair it claims, against the model run on rows that each hold
  their (caption, image) pair, the image copied per row."""
  config = _config()
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    graph, params = nnx.split(KLIP(config.model, VOCAB, rngs=nnx.Rngs(params=0)))
  batch = _batch(3, b=4)
  ids = np.asarray(batch["text_ids"]).copy()
  ids[:, 0] = TOKENS.enc
  clause = ids[::-1].copy() if clause_negatives else None
  if clause_negatives:
    clause[:, 5] = 9
  neg_text, neg_image = np.asarray([2, 0, 3, 1]), np.asarray([1, 3, 0, 2])
  # Row by row: (caption, image) of the positives, then each kind of negative.
  captions = np.concatenate([ids, ids, ids[neg_text]] + ([clause] if clause_negatives else []))
  images = np.concatenate([np.arange(4), neg_image, np.arange(4)] + ([np.arange(4)] if clause_negatives else []))

  @jax.jit
  def both(params):
    model = nnx.merge(graph, params)
    image_tokens, _ = model.encode_image(batch["image"])
    got = step_lib.itm_pair_logits(model, ids, image_tokens, neg_text, neg_image, clause, pad_id=TOKENS.pad)
    return got, model.itm_logits(captions, captions != TOKENS.pad, image_tokens[images])

  with mesh_lib.logical_context(mesh, config.mesh.rules):
    got, want = both(params)
  assert got.shape == (16 if clause_negatives else 12, 2)
  np.testing.assert_allclose(got, want, atol=2e-5)
