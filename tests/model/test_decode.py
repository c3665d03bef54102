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
def test_generate_span_equals_greedy_full_forward_and_stops_at_a_stop_token(scan):
  config, mesh, model, images = _model(scan)
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(7, VOCAB, (3, 12)), jnp.int32)
  pad = jnp.ones((3, 12), bool)
  start = jnp.asarray([3, 8, 1])
  graph, state = nnx.split(model)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    tokens, _ = model.encode_image(images)
    # Hand-computed reference: greedy argmax of full decoder passes over the growing prefix.
    greedy = []
    for row in range(3):
      current = np.asarray(ids[row]).copy()
      current[0] = 2
      for j in range(4):
        logits = _masked_log_softmax(model.decoder_logits(
            jnp.asarray(current[None]), pad[:1], tokens[row:row + 1])[0, int(start[row]) - 1 + j])
        current[int(start[row]) + j] = int(logits.argmax())
      greedy.append(current[int(start[row]):int(start[row]) + 4].tolist())
    # Row 0 ends before its 3rd token, row 1 never (a token it does not write), row 2 before its 2nd.
    unused = next(t for t in range(7, VOCAB) if t not in greedy[1])
    stops = [greedy[0][2], unused, greedy[2][1]]
    assert all(stop != g[0] for stop, g in zip(stops, greedy))
    lengths = [next((j for j in range(1, 4) if g[j] == stop), 4) for g, stop in zip(greedy, stops)]
    expected = [g[:n] for g, n in zip(greedy, lengths)]
    stop_ids = jnp.asarray(stops)[:, None]
    span, count = jax.jit(lambda s: decode.generate_span(
        nnx.merge(graph, s), decode.prefill_caption(nnx.merge(graph, s), tokens, ids, pad, dec_id=2)[1],
        ids, start, stop_ids, dec_id=2, banned_ids=BANNED, max_len=4))(state)
  assert np.asarray(count).tolist() == lengths
  for row in range(3):
    assert np.asarray(span)[row, :lengths[row]].tolist() == expected[row]


@pytest.mark.parametrize("scan", [False, True])
def test_score_spans_equals_teacher_forced_full_forward(scan):
  config, mesh, model, images = _model(scan)
  rng = np.random.default_rng(2)
  ids = jnp.asarray(rng.integers(7, VOCAB, (2, 12)), jnp.int32)
  pad = jnp.ones((2, 12), bool)
  start, end_ids = jnp.asarray([2, 5]), jnp.asarray([9, 11])
  candidates = jnp.asarray(rng.integers(7, VOCAB, (2, 3, 3)), jnp.int32)
  lengths = jnp.asarray([[1, 3, 0], [2, 2, 3]])
  graph, state = nnx.split(model)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    tokens, _ = model.encode_image(images[:2])
    got = np.asarray(jax.jit(lambda s: decode.score_spans(
        nnx.merge(graph, s), decode.prefill_caption(nnx.merge(graph, s), tokens, ids, pad, dec_id=2)[1],
        ids, start, candidates, lengths, end_ids, dec_id=2))(state))
    for row in range(2):
      for c in range(3):
        n = int(lengths[row, c])
        if n == 0:
          assert got[row, c] == -np.inf
          continue
        a = int(start[row])
        seq = np.concatenate([np.asarray(ids[row, :a]), np.asarray(candidates[row, c, :n]), [int(end_ids[row])]])
        seq[0] = 2
        logp = np.asarray(jax.nn.log_softmax(model.decoder_logits(
            jnp.asarray(seq[None]), jnp.ones((1, len(seq)), bool), tokens[row:row + 1])[0]))
        want = sum(logp[t - 1, seq[t]] for t in range(a, a + n + 1))
        np.testing.assert_allclose(got[row, c], want, rtol=1e-5, atol=1e-5)


def test_prefill_scores_each_written_token_as_a_full_forward_does():
  config, mesh, model, images = _model(False)
  rng = np.random.default_rng(3)
  ids = jnp.asarray(rng.integers(7, VOCAB, (2, 10)), jnp.int32)
  pad = jnp.asarray(np.arange(10)[None] < np.asarray([[10], [7]]))
  graph, state = nnx.split(model)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    tokens, _ = model.encode_image(images[:2])
    got = np.asarray(jax.jit(lambda s: decode.prefill_caption(
        nnx.merge(graph, s), tokens, ids, pad, dec_id=2)[0])(state))
    for row in range(2):
      seq = np.asarray(ids[row]).copy()
      seq[0] = 2
      logp = np.asarray(jax.nn.log_softmax(model.decoder_logits(
          jnp.asarray(seq[None]), pad[row:row + 1], tokens[row:row + 1])[0]))
      want = [0.0] + [logp[t - 1, int(ids[row, t])] for t in range(1, 10)]
      valid = np.asarray(pad[row])
      np.testing.assert_allclose(got[row][valid], np.asarray(want)[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_generation_equals_full_forward_and_beam_scores_no_worse(scan):
  config, mesh, model, images = _model(scan)
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
    # Each beam's score is its caption's log-probability under a full forward pass: the cached
    # keys/values followed the beams through every reordering.
    full = np.asarray(_masked_log_softmax(model.decoder_logits(jnp.asarray(beam), jnp.asarray(beam != 0), tokens)))
  np.testing.assert_array_equal(greedy, ids)
  np.testing.assert_allclose(greedy_logp, logp, rtol=1e-5)
  length = lambda x: np.maximum((x != 0).sum(1), 1)
  assert np.all(beam_logp / length(beam) >= greedy_logp / length(greedy) - 1e-5)
  written = [sum(full[row, t - 1, beam[row, t]] for t in range(1, 10) if beam[row, t] != 0) for row in range(3)]
  np.testing.assert_allclose(beam_logp, written, rtol=1e-4, atol=1e-4)


def test_generation_longer_than_the_position_embeddings_is_refused():
  """Positions past the decoder's max_len have no embedding: generation would score NaN and
  write padding where it was banned, so it is refused up front."""
  config, mesh, model, images = _model(False)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    tokens, _ = model.encode_image(images)
    with pytest.raises(ValueError, match=r"max_len=129\) exceeds the decoder.s max_len 128"):
      decode.generate(model, tokens, max_len=129, dec_id=2, sep_id=3, pad_id=0)
