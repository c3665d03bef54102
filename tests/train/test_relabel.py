"""SCIO relabelling: the screening rule, clause removal and keyword masking on real token
ids, proofreading a memorised keyword, and online == offline corrected captions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klip_jax import config as config_lib
from klip_jax.data import builder, knowledge, pipeline, records
from klip_jax.data.prepare import RunData
from klip_jax.data.tokenizer import TextCodec, TokenIds
from klip_jax.errors import ConfigError
from klip_jax.model import decode
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import relabel, scio
from klip_jax.train import state as state_lib
from klip_jax.train import step as step_lib
from tests.data.text_cases import all_template_captions
from tests.xla import optimized_xla

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


def test_removing_flagged_clauses_gives_the_caption_the_text_pipeline_gives(codec):
  """Several clauses at once, any order, -1 padding; the reference removes them one by one from
  the caption text (last first), as the offline SCIO pipeline does."""
  for caption, spans in all_template_captions()[:4]:
    encoded = codec.encode(caption, spans)
    for flags in ((1, 5, -1), (7, 6, -1), (0, 7, 3), (-1, -1, -1), (2, -1, -1)):
      ids, kw, clause = relabel.remove_clauses(
          jnp.asarray(encoded.ids)[None], jnp.asarray(encoded.keyword_mask)[None],
          jnp.asarray(encoded.clause_ids)[None], jnp.asarray([flags], jnp.int32),
          separator_id=codec.separator_id, pad_id=codec.pad_id, max_clauses=8)
      expected, expected_spans = caption, spans
      for k in sorted({f for f in flags if f >= 0}, reverse=True):
        expected, expected_spans = pipeline.remove_clause(expected, expected_spans, k)
      assert codec.decode(np.asarray(ids[0])) == expected, flags
      keyword_text = codec.sp.decode([int(i) for i in np.asarray(ids[0])[np.asarray(kw[0]) > 0]])
      assert keyword_text.split() == " ".join(expected[a:b] for a, b in expected_spans).split()
      assert not set(flags) & set(np.asarray(clause[0]).tolist()) - {-1}


def test_flag_best_takes_up_to_count_clauses_above_the_bar_best_first():
  score = jnp.asarray([[0.5, 2.0, -1.0, 1.0], [-1.0, -2.0, 0.1, 3.0], [0.0, -1.0, -2.0, -3.0]])
  valid = jnp.asarray([[True] * 4, [True, True, True, False], [True] * 4])
  assert relabel.flag_best(score, valid, 3).tolist() == [[1, 3, 0], [2, -1, -1], [-1, -1, -1]]
  assert relabel.flag_best(score, valid, 1)[:, 0].tolist() == relabel.flag(score, valid).tolist() == [1, 2, -1]


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


def _rewrite(graph, images, flagged, fields, scio_config, tokens, candidates, params, ids, kw, cl):
  model = nnx.merge(graph, params)
  image_tokens, _ = model.encode_image(images)
  _, cache = decode.prefill_caption(model, image_tokens, ids, ids != tokens.pad, dec_id=tokens.dec)
  return relabel.rewrite_flags(model, image_tokens, cache, ids, kw, cl, flagged, fields, scio=scio_config,
                               tokens=tokens, candidates=candidates)


@pytest.mark.slow  # a parity / end-to-end run: the full suite's tier
def test_proofreading_rewrites_a_memorised_keyword_of_another_length(tiny_data, tiny_tokenizer):
  """A decoder that memorised its captions, shown a wrong keyword with fewer or more tokens than
  the true one, writes the true keyword and ends it at the clause boundary: free generation
  and candidate ranking both give back the true caption exactly, tokens and masks; and so do
  both wrong keywords of one caption, flagged together (the later clause ranked first; each is
  rewritten after the ones before it, from a caption whose keywords before it are corrected)."""
  config, codec, mesh, tx, schedule, graph, state, shardings, batch = _setup(
      tiny_data, tiny_tokenizer, itc=0.0, itm=0.0, recon=1.0)
  tokens = TokenIds.from_codec(codec)
  inputs = {k: batch[k] for k in MODEL_INPUTS}
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    with optimized_xla():  # 200 steps: XLA's optimizations pay for their compile time
      train = step_lib.make_train_step(config, graph, tx, schedule, tokens, shardings, mesh)
      for i in range(200):
        state, metrics = train(state, inputs, jax.random.key(i))
    assert float(metrics["recon_acc"]) > 0.99
    source = builder.open_split(tiny_data, "train")
    rows = [records.from_example(source[int(i)], decode_rasters=False) for i in batch["index"]]
    candidates = scio.field_candidates(RunData(tiny_data, codec), max_candidates=64)

    fixes = {}
    for use_candidates in (False, True):  # one program per mode and number of flags
      scio_config = config.scio.copy_and_resolve_references()
      scio_config.candidates = use_candidates
      fixes[use_candidates] = jax.jit(functools.partial(_rewrite, graph, inputs["image"],
                                                        fields=jnp.asarray(batch["clause_fields"]),
                                                        scio_config=scio_config, tokens=tokens,
                                                        candidates=candidates))
    cases = (((0,), ("sea",)), ((4,), ("runways and water and vegetation and roads",)),
             ((4, 0), ("runways and water and vegetation and roads", "sea")))
    for clauses, wrongs in cases:
      wrong_ids = []
      for r in rows:
        keywords = list(r["keywords"])
        for clause, wrong in zip(clauses, wrongs):
          keywords[clause] = wrong
        wrong_ids.append(codec.encode(*knowledge.replace_keywords(r["caption"], r["spans"], keywords)))
      ids, kw, cl = (jnp.asarray(np.stack([getattr(e, n) for e in wrong_ids]))
                     for n in ("ids", "keyword_mask", "clause_ids"))
      flagged = jnp.tile(jnp.asarray(clauses, jnp.int32), (len(rows), 1))
      for fix in fixes.values():
        out_ids, out_kw, out_cl, span = (np.asarray(x) for x in fix(flagged=flagged, params=state.params, ids=ids,
                                                                    kw=kw, cl=cl))
        np.testing.assert_array_equal(out_ids, batch["text_ids"])
        np.testing.assert_array_equal(out_kw, batch["keyword_mask"])
        np.testing.assert_array_equal(out_cl, batch["clause_ids"])
        np.testing.assert_array_equal(span, (batch["keyword_mask"] > 0) & np.isin(batch["clause_ids"], clauses))


def test_field_candidates_are_the_closed_fields_keywords_tokenised_as_captions_do(tiny_data, tiny_tokenizer):
  codec = TextCodec(tiny_tokenizer, 128)
  candidates = scio.field_candidates(RunData(tiny_data, codec), max_candidates=8)
  source = builder.open_split(tiny_data, "train")
  values = {slot: set() for slot in knowledge.FIELD_SLOTS}
  in_captions = []
  for i in range(len(source)):
    r = records.from_example(source[i], decode_rasters=False)
    encoded = codec.encode(r["caption"], r["spans"])
    slots = knowledge.field_slots(r["scene_type"], r["field_names"])
    for k, keyword in enumerate(r["keywords"]):
      values[(r["scene_type"], r["field_names"][k])].add(keyword)
      in_captions.append((slots[k], encoded.ids[(encoded.keyword_mask > 0) & (encoded.clause_ids == k)].tolist()))
  closed = [len(values[slot]) <= 8 for slot in knowledge.FIELD_SLOTS]
  assert 0 < sum(closed) < len(closed)  # the test data has both kinds
  for f, slot in enumerate(knowledge.FIELD_SLOTS):
    assert (candidates.lengths[f] > 0).sum() == (len(values[slot]) if closed[f] else 0), slot
  for f, ids in in_captions:  # a closed field's keyword, as the caption tokenises it, is a candidate
    if closed[f]:
      assert ids in [candidates.ids[f, c, :n].tolist() for c, n in enumerate(candidates.lengths[f]) if n]


@pytest.mark.slow  # a parity run: online == offline
@pytest.mark.parametrize("max_flags,rewrite_threshold", [(1, 0.0), (3, 0.0), (3, 1.0)])
def test_online_and_offline_give_identical_corrected_captions(tiny_data, tiny_tokenizer, tmp_path, max_flags,
                                                              rewrite_threshold):
  """The relabel step's corrected and stage-B captions (token ids) read as the offline pipeline
  builds them from the round's entries (text). With a rewrite bar, the flags below it are
  removed from the corrected caption rather than rewritten, the others rewritten."""
  config, codec, mesh, _tx, _schedule, graph, state, shardings, batch = _setup(tiny_data, tiny_tokenizer, n=12)
  config.scio.max_flags = max_flags
  if rewrite_threshold:  # a bar in field-z: the decoder rule's units
    config.scio.update(rule="decoder", field_calibration=True, threshold=0.0, rewrite_threshold=rewrite_threshold)
  # A random model's rewrites are garbage of up to max_fill tokens; kept short, no corrected
  # caption outgrows the 96 slots (past them the ids are cut where the re-tokenised text is not).
  config.scio.max_fill = 4
  tokens = TokenIds.from_codec(codec)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    fn = relabel.make_relabel_step(config, graph, tokens, shardings.params, mesh)
    online = jax.device_get(fn(state.params, {k: batch[k] for k in MODEL_INPUTS}, jax.random.key(0)))
    entries = scio.relabel_split(fn, state.params, RunData(tiny_data, codec), "train", mesh, 12, progress=False)
  assert (online.flagged >= 0).sum() >= 2  # a random model still flags some clauses
  assert online.flagged.shape == (12, max_flags) and (online.flagged >= 0).sum(1).max() == max_flags
  flag_z = np.take_along_axis(online.score, np.maximum(online.flagged, 0), 1) + config.scio.threshold
  np.testing.assert_array_equal(online.dropped, (online.flagged >= 0) & (flag_z < rewrite_threshold))
  if rewrite_threshold:  # both kinds occur, and a removed clause is gone from the corrected caption
    assert online.dropped.any() and ((online.flagged >= 0) & ~online.dropped).any()
    clauses = lambda ids: codec.decode(ids).count(knowledge.SEPARATOR) + 1
    for row in range(12):
      assert clauses(online.corrected_ids[row]) == clauses(batch["text_ids"][row]) - online.dropped[row].sum()
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


def test_every_stage_spells_out_the_reconstruction_target_and_rate():
  """One batch structure in stages A, B and C (so one compiled train step): A and C reconstruct
  the caption itself, B keeps the target its round wrote; only C adds extra positions."""
  config = config_lib.load("configs/tiny.py")
  config.loss.extra_mask_rate, config.scio.stage_c_extra_mask_rate = 0.0, 0.25
  caption = {"text_ids": np.arange(6).reshape(2, 3), "keyword_mask": np.ones((2, 3)),
             "clause_ids": np.zeros((2, 3)), "image": np.zeros((2, 4, 4, 1))}
  removed = {"recon_ids": np.full((2, 3), 9), "recon_keyword_mask": np.zeros((2, 3)),
             "recon_clause_ids": np.full((2, 3), -1)}
  batches = {stage: scio.reconstruction_inputs({**caption, **(removed if stage == "B" else {})}, config, stage)
             for stage in scio.STAGES}
  assert len({tuple(sorted(b)) for b in batches.values()}) == 1
  for stage, batch in batches.items():
    for recon, own in (("recon_ids", "text_ids"), ("recon_keyword_mask", "keyword_mask"),
                       ("recon_clause_ids", "clause_ids")):
      np.testing.assert_array_equal(batch[recon], removed[recon] if stage == "B" else caption[own])
    assert batch["recon_extra_rate"].dtype == np.float32
    np.testing.assert_array_equal(batch["recon_extra_rate"], [0.25, 0.25] if stage == "C" else [0.0, 0.0])


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


def test_repair_metrics_count_every_flag_of_a_caption():
  entries = [  # 4 clauses; 1 and 3 corrupted. Flags: 3 (restored), 0 (clean, kept), 2 (clean, changed).
      {"caption": "a$b$c$d", "flagged": [3, 0, 2], "truth": {"1": "x", "3": "y"},
       "original_keyword": ["w", "a", "c"], "corrected_keyword": ["y", "a", "e"]},
      {"caption": "a$b", "flagged": [], "truth": {"0": "z"}, "original_keyword": [], "corrected_keyword": []},
  ]
  m = scio.repair_metrics(entries, max_flags=3)
  assert m["flagged"] == 3 and m["screening_precision"] == pytest.approx(1 / 3)
  assert m["screening_recall"] == pytest.approx(1 / 3) and m["proofreading_accuracy"] == 1.0
  assert m["clean_clauses_changed"] == 1 and m["clean_clauses_changed_rate"] == pytest.approx(1 / 3)
  # Three flags among six clauses at random find each corrupted clause with probability 1/2.
  assert m["chance_screening_recall"] == pytest.approx(1 / 2)
  assert m["max_screening_recall"] == 1.0
  assert scio.repair_metrics(entries, max_flags=1)["max_screening_recall"] == pytest.approx(2 / 3)


def test_repair_metrics_count_removed_flags_apart_from_rewritten_ones():
  entries = [  # 5 clauses; 0, 1 and 4 corrupted. Flags: 1 rewritten (restored), 4 removed, 2 removed (clean),
      # 3 rewritten (clean, changed).
      {"caption": "a$b$c$d$e", "flagged": [1, 4, 2, 3], "dropped": [4, 2], "truth": {"0": "v", "1": "x", "4": "y"},
       "original_keyword": ["w", "u", "c", "d"], "corrected_keyword": ["x", "", "", "f"]},
      {"caption": "a$b$c", "flagged": [], "dropped": [], "truth": {}, "original_keyword": [], "corrected_keyword": []},
  ]
  m = scio.repair_metrics(entries, max_flags=4)
  assert m["flagged"] == 4 and m["screening_precision"] == 0.5 and m["screening_recall"] == pytest.approx(2 / 3)
  assert m["rewritten"] == 2 and m["proofreading_accuracy"] == 1.0  # the one corrupted keyword rewritten
  assert m["removed"] == 2 and m["corrupted_clauses_removed"] == 1
  assert m["clean_clauses_changed"] == 1 and m["clean_clauses_changed_rate"] == pytest.approx(1 / 5)
  assert m["clean_clauses_removed_rate"] == pytest.approx(1 / 5)
  # Wrong before: 3 of 8 clauses. After: clause 0 (never flagged) and 3 (changed), of the 6 left.
  assert m["wrong_clause_rate_before"] == pytest.approx(3 / 8) and m["wrong_clause_rate_after"] == pytest.approx(2 / 6)


def test_a_rewrite_bar_needs_a_rule_with_units_above_the_flag_bar():
  config = config_lib.load("configs/tiny.py")
  config.scio.update(rule="decoder", threshold=0.5, rewrite_threshold=1.5)
  config_lib.validate(config)
  config.scio.rewrite_threshold = 0.5
  with pytest.raises(ConfigError, match=r"scio.rewrite_threshold: 0.5 must exceed scio.threshold \(0.5\)"):
    config_lib.validate(config)
  config.scio.update(rule="paper", rewrite_threshold=1.5)
  with pytest.raises(ConfigError, match="scio.rewrite_threshold: the paper rule's score has no units"):
    config_lib.validate(config)


def test_entry_flags_read_listed_flags_and_the_single_flag_of_older_rounds():
  listed = {"flagged": [2, 0], "original_keyword": ["a", "b"], "corrected_keyword": ["c", "b"]}
  assert pipeline.entry_flags(listed) == [(2, "a", "c"), (0, "b", "b")]
  assert pipeline.entry_flags({"flagged": 1, "original_keyword": "a", "corrected_keyword": "c"}) == [(1, "a", "c")]
  assert pipeline.entry_flags({"flagged": -1, "original_keyword": "", "corrected_keyword": ""}) == []


@pytest.mark.slow  # a parity / end-to-end run: the full suite's tier
def test_the_last_batchs_padding_leaves_its_captions_flags_as_a_batch_of_them_alone(tiny_data, tiny_tokenizer):
  """The val split's 12 captions in batches of 8 end in 4 captions and 4 padding rows: with
  screening standardised by the batch's field statistics, those 4 get the flags and scores
  they get in a batch of their own (batches of 4: no padding)."""
  config, codec, mesh, *_, graph, state, shardings, _ = _setup(tiny_data, tiny_tokenizer)
  config.scio.update(rule="decoder", field_calibration=True, threshold=0.0, max_flags=2)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    fn = relabel.make_relabel_step(config, graph, TokenIds.from_codec(codec), shardings.params, mesh, proofread=False)
    padded, alone = (scio.relabel_split(fn, state.params, RunData(tiny_data, codec), "val", mesh, b, progress=False)
                     for b in (8, 4))
  assert len(padded) == len(alone) == 12
  for a, b in zip(padded[8:], alone[8:]):
    assert a["id"] == b["id"] and a["flagged"] == b["flagged"]
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-4)
  assert any(e["flagged"] for e in alone[8:])


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


def test_splice_replaces_a_span_with_one_of_another_length():
  x = jnp.asarray([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
  new = jnp.asarray([[7, 8, 9], [7, 8, 9]])
  out = relabel.splice(x, jnp.asarray([1, 2]), jnp.asarray([2, 1]), new, jnp.asarray([3, 1]), fill=0)
  # Row 0: [2, 3] -> [7, 8, 9] (the tail shifts right and is cut); row 1: [3] -> [7] (in place).
  assert np.asarray(out).tolist() == [[1, 7, 8, 9, 4, 5], [1, 2, 7, 4, 5, 6]]
  shorter = relabel.splice(x[:1], jnp.asarray([1]), jnp.asarray([3]), new[:1], jnp.asarray([1]), fill=0)
  assert np.asarray(shorter).tolist() == [[1, 7, 5, 6, 0, 0]]


def test_relative_rule_scores_removals_against_the_captions_other_removals():
  itc = jnp.asarray([[0.50, 0.51, 0.49, 0.60, 0.50]])  # original, then 4 removals
  itm = jnp.asarray([[0.30, 0.30, 0.31, 0.45, 0.29]])
  valid = jnp.ones((1, 4), bool)
  config = config_lib.load("configs/tiny.py")
  config.scio.update(rule="relative", threshold=1.0)
  fields = jnp.zeros((1, 4), jnp.int32)
  score = np.asarray(relabel.rule_score(config.scio, itc, itm, valid, fields))
  # By hand: z-scores of each gain within the caption, averaged over ITC and ITM, minus 1.
  def z(g):
    g = np.asarray(g, np.float64)
    return (g - g.mean()) / g.std()
  expected = (z([0.01, -0.01, 0.10, 0.0]) + z([0.0, 0.01, 0.15, -0.01])) / 2 - 1.0
  np.testing.assert_allclose(score[0], expected, rtol=1e-4, atol=1e-5)
  assert relabel.flag(jnp.asarray(score), valid).tolist() == [2]
  config.scio.threshold = 2.0  # the best removal stands out by less than 2 standard units
  assert relabel.flag(relabel.rule_score(config.scio, itc, itm, valid, fields), valid).tolist() == [-1]


def test_field_calibration_removes_each_fields_batch_mean_and_spread():
  gain = jnp.asarray([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
  fields = jnp.asarray([[0, 1], [0, 1], [0, -1]])
  valid = jnp.asarray([[True, True], [True, True], [True, False]])
  out = np.asarray(relabel.standardise_by_field(gain, valid, fields, num_fields=2))
  f0 = np.asarray([1.0, 3.0, 5.0])
  np.testing.assert_allclose(out[:, 0], (f0 - f0.mean()) / f0.std(), rtol=1e-5)
  np.testing.assert_allclose(out[:2, 1], [-1.0, 1.0], rtol=1e-5)  # field 1: 10 and 30


def test_paper_score_is_positive_exactly_where_the_paper_rule_would_flag():
  itc = jnp.asarray([[0.5, 0.6, 0.4, 0.7, 0.8]])
  itm = jnp.asarray([[0.5, 0.4, 0.9, 0.6, 0.55]])
  valid = jnp.asarray([[True, True, True, False]])
  score = np.asarray(relabel.paper_score(*relabel.gains(itc, itm), valid))
  assert (score[0, :3] > 0).tolist() == [False, False, True]
  assert score[0, 3] == -np.inf


def test_keyword_surprise_sums_each_clauses_keyword_token_log_likelihoods():
  # Two captions of 8 tokens; clause ids and keyword masks laid out by hand.
  logp = np.log(np.asarray([[1.0, 0.5, 0.25, 0.8, 0.1, 0.9, 0.5, 1.0],
                            [1.0, 0.2, 0.4, 0.5, 0.5, 0.3, 1.0, 1.0]]))
  clause_ids = np.asarray([[-1, 0, 0, 0, 1, 1, 1, -1], [-1, 0, 0, 1, 1, 2, 2, -1]])
  keyword_mask = np.asarray([[0, 0, 1, 1, 0, 1, 1, 0], [0, 1, 0, 1, 1, 0, 1, 0]])
  got = np.asarray(relabel.keyword_surprise(jnp.asarray(logp, jnp.float32), jnp.asarray(keyword_mask),
                                            jnp.asarray(clause_ids), max_clauses=3))
  expected = -np.log([[0.25 * 0.8, 0.9 * 0.5, 1.0], [0.2, 0.5 * 0.5, 1.0]])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_decoder_rule_flags_the_most_surprising_keyword_in_its_fields_units():
  # Three captions of two clauses; field 0 is always more surprising than field 1, so without
  # calibration the first clause would look wrong everywhere. Calibrated, caption 1's field-1
  # keyword stands out against the other captions' field-1 keywords.
  surprise = jnp.asarray([[6.0, 1.0], [6.0, 4.0], [6.2, 1.1]])
  fields = jnp.asarray([[0, 1], [0, 1], [0, 1]])
  valid = jnp.ones((3, 2), bool)
  itc = itm = jnp.zeros((3, 3))  # not read by the decoder rule
  config = config_lib.load("configs/tiny.py")
  config.scio.update(rule="decoder", field_calibration=True, threshold=1.0)
  score = np.asarray(relabel.rule_score(config.scio, itc, itm, valid, fields, surprise))
  def z(v):
    v = np.asarray(v, np.float64)
    return (v - v.mean()) / v.std()
  expected = np.stack([z([6.0, 6.0, 6.2]), z([1.0, 4.0, 1.1])], 1) - 1.0
  np.testing.assert_allclose(score, expected, rtol=1e-4, atol=1e-5)
  assert relabel.flag(jnp.asarray(score), valid).tolist() == [-1, 1, 0]
  config.scio.field_calibration = False  # within the caption: the first clause always stands out
  config.scio.threshold = 0.5
  assert relabel.flag(relabel.rule_score(config.scio, itc, itm, valid, fields, surprise), valid).tolist() == [0, 0, 0]


@pytest.mark.parametrize("rule", ["paper", "relative", "decoder"])
def test_skipped_fields_are_never_flagged_and_the_rest_flag_as_before(rule):
  """Every rule scores a clause of a field in scio.skip_fields -inf (never flagged), the field
  named as configs name it; the other clauses keep their scores, so the next best is flagged."""
  slot = {name: i for i, name in enumerate(knowledge.slot_names())}
  fields = jnp.asarray([[slot["target.count"], slot["target.region"], slot["target.size"]]] * 2)
  surprise = jnp.asarray([[1.0, 9.0, 8.0], [1.0, 8.0, 0.0]])
  itc = jnp.asarray([[0.0, 0.1, 0.9, 0.8], [0.0, 0.1, 0.8, -0.1]])  # removing clause 1 raises both most
  itm = itc
  valid = jnp.ones((2, 3), bool)
  config = config_lib.load("configs/tiny.py")
  config.scio.update(rule=rule, field_calibration=False, threshold=0.1)
  before = np.asarray(relabel.rule_score(config.scio, itc, itm, valid, fields, surprise))
  assert relabel.flag(jnp.asarray(before), valid).tolist() == [1, 1]
  config.scio.skip_fields = "landform.water, target.region"
  after = np.asarray(relabel.rule_score(config.scio, itc, itm, valid, fields, surprise))
  assert np.isneginf(after[:, 1]).all()
  np.testing.assert_array_equal(after[:, [0, 2]], before[:, [0, 2]])
  rest = np.where(np.arange(3) == 1, -np.inf, before)  # the best of the other clauses, when above the bar
  expected = [int(r.argmax()) if r.max() > 0 else -1 for r in rest]
  assert relabel.flag(jnp.asarray(after), valid).tolist() == expected and expected != [-1, -1]
  config.scio.skip_fields = "target.city"
  with pytest.raises(ConfigError, match=r"scio.skip_fields: unknown fields \['target.city'\]"):
    config_lib.validate(config)


def test_the_decoder_rule_skips_the_removal_passes_and_flags_and_rewrites_the_same(tiny_data, tiny_tokenizer):
  """Training's relabel step under the decoder rule scores no leave-one-out variant (ITC and
  ITM come back NaN) and flags and rewrites exactly as the evaluation's step that scores every
  signal; its surprise is the decoder's -log p of each keyword, recomputed here from a full
  decoder pass."""
  config, codec, mesh, _tx, _schedule, graph, state, shardings, batch = _setup(tiny_data, tiny_tokenizer)
  config.scio.update(rule="decoder", field_calibration=True, threshold=0.5, max_fill=4)
  tokens = TokenIds.from_codec(codec)
  inputs = {k: batch[k] for k in MODEL_INPUTS}
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    every, lean = (jax.device_get(relabel.make_relabel_step(
        config, graph, tokens, shardings.params, mesh, every_signal=e)(state.params, inputs, jax.random.key(0)))
        for e in (True, False))
    model = nnx.merge(graph, state.params)
    image_tokens, _ = model.encode_image(jnp.asarray(inputs["image"]))
    ids = np.asarray(inputs["text_ids"])
    logits = model.decoder_logits(jnp.asarray(ids).at[:, 0].set(tokens.dec), jnp.asarray(ids != tokens.pad),
                                  image_tokens)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  assert np.isnan(lean.itc).all() and np.isnan(lean.itm).all() and np.isfinite(every.itc).all()
  assert (every.flagged >= 0).sum() >= 2
  for name in ("flagged", "corrected_ids", "corrected_keyword_mask", "removed_ids"):
    np.testing.assert_array_equal(getattr(lean, name), getattr(every, name), err_msg=name)
  keyword, clause = np.asarray(inputs["keyword_mask"]) > 0, np.asarray(inputs["clause_ids"])
  for row in range(ids.shape[0]):
    for k in range(int(clause[row].max()) + 1):
      positions = np.flatnonzero(keyword[row] & (clause[row] == k))
      want = -sum(logp[row, t - 1, ids[row, t]] for t in positions)
      np.testing.assert_allclose(lean.surprise[row, k], want, rtol=1e-4, atol=1e-4)


def test_a_rewrite_replaces_the_written_keyword_only_by_more_than_the_margin(tiny_data, tiny_tokenizer):
  """keep_written swaps clause 1's keyword for clause 2's exactly where a full decoder pass
  (no cache) finds the swap more than `margin` nats likelier in place, the keyword and the
  token after it scored; elsewhere the written keyword comes back, tokens and length."""
  _config, codec, _mesh, _tx, _schedule, graph, state, _shardings, batch = _setup(tiny_data, tiny_tokenizer)
  tokens = TokenIds.from_codec(codec)
  ids, kw, cl = (np.asarray(batch[k]) for k in ("text_ids", "keyword_mask", "clause_ids"))
  span = lambda k: (kw > 0) & (cl == k)
  start, old_len = span(1).argmax(1), span(1).sum(1)
  width = 8
  new_len = span(2).sum(1)
  assert (old_len <= width).all() and (new_len <= width).all()
  new = np.zeros((len(ids), width), np.int32)
  for row in range(len(ids)):
    new[row, :new_len[row]] = ids[row, span(2)[row]]
  after = ids[np.arange(len(ids)), start + old_len]
  model = nnx.merge(graph, state.params)
  image_tokens, _ = model.encode_image(jnp.asarray(batch["image"]))

  def full_logp(caption, first, length):  # the keyword's tokens and the token after it
    logits = model.decoder_logits(jnp.asarray(caption).at[:, 0].set(tokens.dec),
                                  jnp.asarray(caption != tokens.pad), image_tokens)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    return np.asarray([sum(logp[r, t - 1, caption[r, t]] for t in range(first[r], first[r] + length[r] + 1))
                       for r in range(len(caption))])

  swapped = np.asarray(relabel.splice(jnp.asarray(ids), jnp.asarray(start), jnp.asarray(old_len),
                                      jnp.asarray(new), jnp.asarray(new_len), tokens.pad))
  gain = full_logp(swapped, start, new_len) - full_logp(ids, start, old_len)
  _, cache = decode.prefill_caption(model, image_tokens, jnp.asarray(ids), jnp.asarray(ids != tokens.pad),
                                    dec_id=tokens.dec)
  keep = jax.jit(functools.partial(relabel.keep_written, dec_id=tokens.dec))  # one program for every margin
  ordered = np.sort(gain)  # margins between the rows' gains (a negative one: the rewrite may be less likely)
  margins = [m for m, gap in zip(ordered[:-1] + np.diff(ordered) / 2, np.diff(ordered)) if gap > 2e-3]
  assert len(margins) >= 5 and any(m > 0 for m in margins)  # each far from every gain in float32 terms
  for margin in margins:
    out, out_len = (np.asarray(x) for x in keep(model, cache, jnp.asarray(ids), jnp.asarray(start),
                                                 jnp.asarray(old_len), jnp.asarray(new), jnp.asarray(new_len),
                                                 jnp.asarray(after), margin=float(margin)))
    replaced = gain > margin
    assert 0 < replaced.sum() < len(ids)
    np.testing.assert_array_equal(out_len, np.where(replaced, new_len, old_len))
    for row in range(len(ids)):
      want = new[row] if replaced[row] else ids[row, start[row]:start[row] + width] * (np.arange(width) < old_len[row])
      np.testing.assert_array_equal(out[row], want)
