"""SCIO relabelling: the screening rule, clause removal and keyword masking on real token
ids, proofreading a memorised keyword, and online == offline corrected captions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klip_jax import config as config_lib
from klip_jax.data import pipeline
from klip_jax.data.prepare import RunData
from klip_jax.data.tokenizer import TextCodec, TokenIds
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import relabel, scio
from klip_jax.train import state as state_lib
from klip_jax.train import step as step_lib
from tests.data.text_cases import all_template_captions

MODEL_INPUTS = step_lib.MODEL_INPUTS


def test_screening_requires_both_scores_to_improve():
  itc = jnp.array([[0.5, 0.6, 0.4, 0.7]])  # original, then variants 0..2
  itm = jnp.array([[0.5, 0.4, 0.9, 0.6]])
  valid = jnp.ones((1, 3), bool)
  # Variant 0: ITC up, ITM down. Variant 1: ITM up, ITC down. Variant 2: both up.
  assert relabel.screen(itc, itm, valid).tolist() == [2]


def test_screening_takes_the_best_itc_among_qualifying_variants():
  itc = jnp.array([[0.1, 0.3, 0.5, 0.4]])
  itm = jnp.array([[0.1, 0.9, 0.2, 0.3]])
  assert relabel.screen(itc, itm, jnp.ones((1, 3), bool)).tolist() == [1]


def test_screening_flags_nothing_when_no_variant_wins_or_it_is_invalid():
  itc = jnp.array([[0.5, 0.4, 0.5, 0.9], [0.5, 0.4, 0.1, 0.9]])
  itm = jnp.array([[0.5, 0.6, 0.6, 0.4], [0.5, 0.4, 0.1, 0.9]])
  valid = jnp.array([[True, True, True], [True, True, False]])  # ties do not count either
  assert relabel.screen(itc, itm, valid).tolist() == [-1, -1]


@pytest.fixture(scope="module")
def codec(tiny_tokenizer):
  return TextCodec(tiny_tokenizer, max_len=128)


def test_leave_one_out_removes_exactly_one_clause_of_real_token_ids(codec):
  for caption, spans in all_template_captions():
    encoded = codec.encode(caption, spans)
    ids, kw, clause, valid = relabel.leave_one_out(
        jnp.asarray(encoded.ids)[None], jnp.asarray(encoded.keyword_mask)[None],
        jnp.asarray(encoded.clause_ids)[None], separator_id=codec.separator_id, pad_id=codec.pad_id,
        max_clauses=10)
    assert valid[0].tolist() == [True] * 8 + [False] * 2
    for k in range(8):
      expected, expected_spans = pipeline.remove_clause(caption, spans, k)
      assert codec.decode(np.asarray(ids[0, k])) == expected
      # The remaining keyword tokens are exactly those of the other clauses.
      keyword_text = codec.sp.decode([int(i) for i in np.asarray(ids[0, k])[np.asarray(kw[0, k]) > 0]])
      assert keyword_text.split() == " ".join(expected[a:b] for a, b in expected_spans).split()
      assert k not in np.asarray(clause[0, k]).tolist()


def test_keyword_masks_select_the_clause_keyword_tokens(codec):
  caption, spans = all_template_captions()[3]
  encoded = codec.encode(caption, spans)
  for k, (a, b) in enumerate(spans):
    mask = (encoded.keyword_mask > 0) & (encoded.clause_ids == k)
    assert codec.sp.decode([int(i) for i in encoded.ids[mask]]).strip() == caption[a:b]


def _setup(tiny_data, tiny_tokenizer, n=8, **loss):
  config = config_lib.load("configs/tiny.py")
  config.model.vision.image_size = 48
  config.train.batch_size = n
  config.momentum.enabled = False
  config.optim.update(lr=3e-3, warmup_steps=5, weight_decay=0.0, grad_clip=1000.0)
  config.loss.update(**loss)
  codec = TextCodec(tiny_tokenizer, 96)
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  tx, schedule = state_lib.make_optimizer(config.optim, 200)
  graph, state, shardings = state_lib.create(config, codec.vocab_size, tx, mesh)
  batch = next(iter(pipeline.build(pipeline.PipelineOptions(tiny_data, "train", n, train=False), codec)))
  return config, codec, mesh, tx, schedule, graph, state, shardings, batch


@pytest.mark.slow  # a parity / end-to-end run: the full suite's tier
def test_decoder_fill_restores_a_memorised_keyword(tiny_data, tiny_tokenizer):
  config, codec, mesh, tx, schedule, graph, state, shardings, batch = _setup(
      tiny_data, tiny_tokenizer, itc=0.0, itm=0.0, recon=1.0)
  tokens = TokenIds.from_codec(codec)
  inputs = {k: batch[k] for k in MODEL_INPUTS}
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    train = step_lib.make_train_step(config, graph, tx, schedule, tokens, shardings, mesh)
    for i in range(200):
      state, metrics = train(state, inputs, jax.random.key(i))
    assert float(metrics["recon_acc"]) > 0.99

    from flax import nnx

    from klip_jax.model import decode

    @jax.jit
    def fill(params, ids, fill_mask):
      model = nnx.merge(graph, params)
      image_tokens, _ = model.encode_image(inputs["image"])
      return decode.fill_spans(model, image_tokens, ids, ids != codec.pad_id, fill_mask,
                               dec_id=codec.dec_id, banned_ids=tokens.special(), max_fill=24)

    for clause in (0, 4):
      fill_mask = (batch["keyword_mask"] > 0) & (batch["clause_ids"] == clause)
      masked = np.where(fill_mask, codec.mask_id, batch["text_ids"])
      restored = np.asarray(fill(state.params, jnp.asarray(masked), jnp.asarray(fill_mask)))
      np.testing.assert_array_equal(restored, batch["text_ids"])


@pytest.mark.slow  # a parity run: online == offline
def test_online_and_offline_give_identical_corrected_captions(tiny_data, tiny_tokenizer, tmp_path):
  config, codec, mesh, _tx, _schedule, graph, state, shardings, batch = _setup(tiny_data, tiny_tokenizer, n=12)
  tokens = TokenIds.from_codec(codec)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    fn = relabel.make_relabel_step(config, graph, tokens, shardings.params, mesh)
    online = jax.device_get(fn(state.params, {k: batch[k] for k in MODEL_INPUTS}, jax.random.key(0)))
    entries = scio.relabel_split(fn, state.params, RunData(tiny_data, codec), "train", mesh, 12, progress=False)
  assert (online.flagged >= 0).sum() >= 2  # a random model still flags some clauses
  scio.write_overlay(str(tmp_path), 1, entries)
  with pytest.raises(Exception, match="never overwritten"):
    scio.write_overlay(str(tmp_path), 1, entries)
  path = scio.overlay_path(str(tmp_path), 1)
  for use, online_ids in (("caption", online.corrected_ids), ("recon", online.removed_ids)):
    options = pipeline.PipelineOptions(tiny_data, "train", 12, train=False, overlay=path, overlay_use=use)
    offline = next(iter(pipeline.build(options, codec)))
    key = "text_ids" if use == "caption" else "recon_ids"
    assert offline["index"].tolist() == batch["index"].tolist()
    for row in range(12):
      assert codec.decode(offline[key][row]) == codec.decode(online_ids[row]), (use, row)


def test_repair_metrics_on_hand_made_entries():
  entries = [
      {"caption": "a$b$c", "flagged": 1, "truth": {"1": "x"}, "original_keyword": "y", "corrected_keyword": "x"},
      {"caption": "a$b$c", "flagged": 0, "truth": {"2": "z"}, "original_keyword": "p", "corrected_keyword": "q"},
      {"caption": "a$b$c", "flagged": -1, "truth": {}, "original_keyword": "", "corrected_keyword": ""},
  ]
  m = scio.repair_metrics(entries)
  assert m["screening_precision"] == 0.5 and m["screening_recall"] == 0.5
  assert m["proofreading_accuracy"] == 1.0 and m["clean_clauses_changed"] == 1
  assert m["clean_clauses_changed_rate"] == pytest.approx(1 / 7)


@pytest.mark.slow  # a parity / end-to-end run: the full suite's tier
def test_relabel_on_the_eight_device_mesh_equals_one_device(tiny_data, tiny_tokenizer):
  config, codec, mesh1, tx, _schedule, graph, state, shardings, batch = _setup(tiny_data, tiny_tokenizer)
  tokens = TokenIds.from_codec(codec)
  inputs = {k: batch[k] for k in MODEL_INPUTS}
  with mesh_lib.logical_context(mesh1, config.mesh.rules):
    one = jax.device_get(relabel.make_relabel_step(config, graph, tokens, shardings.params, mesh1)(
        state.params, inputs, jax.random.key(0)))
  mesh8 = mesh_lib.make_mesh((2, 2, 2))
  _, state8, shardings8 = state_lib.create(config, codec.vocab_size, tx, mesh8)
  with mesh_lib.logical_context(mesh8, config.mesh.rules):
    result = relabel.make_relabel_step(config, graph, tokens, shardings8.params, mesh8)(
        state8.params, pipeline.global_batch(inputs, mesh8), jax.random.key(0))
    assert result.corrected_ids.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  eight = jax.device_get(result)
  np.testing.assert_allclose(eight.itc, one.itc, atol=1e-5)
  np.testing.assert_allclose(eight.itm, one.itm, atol=1e-5)
  np.testing.assert_array_equal(eight.flagged, one.flagged)
  np.testing.assert_array_equal(eight.corrected_ids, one.corrected_ids)
