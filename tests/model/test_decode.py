"""KV-cached decoding against full-forward recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klip_jax import config as config_lib
from klip_jax.model import decode
from klip_jax.model.klip import KLIP
from klip_jax.parallel import mesh as mesh_lib

VOCAB, BANNED = 50, (0, 1, 2, 4, 5, 6)


def _model(scan: bool):
  config = config_lib.load("configs/tiny.py")
  config.model.text.scan_layers = scan
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    model = KLIP(config.model, VOCAB, rngs=nnx.Rngs(params=0))
  images = jnp.asarray(np.random.default_rng(0).standard_normal((3, 32, 32, 1)), jnp.float32)
  return config, mesh, model, images


def _masked_log_softmax(logits):
  return jax.nn.log_softmax(logits.at[..., jnp.asarray(BANNED)].set(-jnp.inf), axis=-1)


@pytest.mark.parametrize("scan", [False, True])
def test_fill_spans_equals_greedy_full_forward_refill(scan):
  config, mesh, model, images = _model(scan)
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(7, VOCAB, (3, 12)), jnp.int32)
  pad = jnp.ones((3, 12), bool)
  fill = jnp.zeros((3, 12), bool).at[0, 3:6].set(True).at[1, 8:9].set(True)  # row 2: nothing
  graph, state = nnx.split(model)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    tokens, _ = model.encode_image(images)
    out = np.asarray(jax.jit(lambda s: decode.fill_spans(
        nnx.merge(graph, s), tokens, ids, pad, fill, dec_id=2, banned_ids=BANNED, max_fill=4))(state))
    expected = np.array(ids)
    current = expected.copy()
    current[:, 0] = 2
    for row in range(3):
      for t in np.flatnonzero(np.asarray(fill[row])):
        logits = model.decoder_logits(jnp.asarray(current), pad, tokens)[row, t - 1]
        current[row, t] = expected[row, t] = int(_masked_log_softmax(logits).argmax())
  np.testing.assert_array_equal(out, expected)


def test_greedy_generation_equals_full_forward_and_beam_scores_no_worse():
  config, mesh, model, images = _model(False)
  graph, state = nnx.split(model)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    tokens, _ = model.encode_image(images)
    generate = jax.jit(lambda s, k: decode.generate(
        nnx.merge(graph, s), tokens, max_len=10, dec_id=2, sep_id=3, pad_id=0,
        banned_ids=BANNED, beam_size=k), static_argnums=1)
    greedy, greedy_logp = (np.asarray(x) for x in generate(state, 1))
    beam, beam_logp = (np.asarray(x) for x in generate(state, 4))
    ids = np.zeros((3, 10), np.int32)
    ids[:, 0] = 2
    logp, done = np.zeros(3), np.zeros(3, bool)
    for t in range(9):
      visible = jnp.asarray(np.arange(10)[None] <= t).repeat(3, 0)
      step = np.asarray(_masked_log_softmax(model.decoder_logits(jnp.asarray(ids), visible, tokens)[:, t]))
      for row in range(3):
        if not done[row]:
          ids[row, t + 1] = step[row].argmax()
          logp[row] += step[row].max()
          done[row] = ids[row, t + 1] == 3
  np.testing.assert_array_equal(greedy, ids)
  np.testing.assert_allclose(greedy_logp, logp, rtol=1e-5)
  length = lambda x: np.maximum((x != 0).sum(1), 1)
  assert np.all(beam_logp / length(beam) >= greedy_logp / length(greedy) - 1e-5)
