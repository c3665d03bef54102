"""grain pipelines: host sharding, epochs, features, text-true flips, global arrays, resume."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from klip_jax.data import builder, gazetteer, knowledge, pipeline, records
from klip_jax.data.tokenizer import TextCodec
from klip_jax.errors import ConfigError


@pytest.fixture(scope="module")
def codec(tiny_tokenizer):
  return TextCodec(tiny_tokenizer, max_len=96)


def _indices(options, codec, host, hosts, batches=None):
  it = iter(pipeline.build(options, codec, process_index=host, process_count=hosts))
  out = []
  for i, batch in enumerate(it):
    if batches is not None and i == batches:
      break
    out.append(batch["index"][batch["valid"]])
  return np.concatenate(out)


def test_two_hosts_read_disjoint_examples_that_cover_the_split(tiny_data, codec):
  options = pipeline.PipelineOptions(tiny_data, "train", batch_size=8, num_epochs=1)
  host0, host1 = (_indices(options, codec, h, 2) for h in (0, 1))
  assert len(host0) == len(host1) == 24
  assert not set(host0) & set(host1)
  assert sorted(np.concatenate([host0, host1])) == list(range(48))


def test_two_hosts_batches_are_the_one_host_batches_split_in_two(tiny_data, codec):
  """Host h's rows are the h-th half of each global batch, augmentation included, so a run on
  2 hosts trains on exactly the batches of a run on 1."""
  options = pipeline.PipelineOptions(tiny_data, "train", batch_size=8, clause_dropout=0.5,
                                     clause_negatives=True)
  streams = [iter(pipeline.build(options, codec, process_index=h, process_count=n))
             for h, n in ((0, 1), (0, 2), (1, 2))]
  for _ in range(8):  # more than one epoch of 48
    whole, half0, half1 = (next(s) for s in streams)
    assert whole.keys() == half0.keys()
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([half0[key], half1[key]]), whole[key], err_msg=key)


def test_eval_pipeline_pads_and_covers_each_example_once(tiny_data, codec):
  """12 examples in global batches of 10: both hosts make 2 calls (the 8 padded rows are
  invalid), split in order."""
  options = pipeline.PipelineOptions(tiny_data, "val", batch_size=10, train=False)
  batches = [list(pipeline.build(options, codec, process_index=h, process_count=2)) for h in (0, 1)]
  assert [len(b) for b in batches] == [2, 2]
  index = np.concatenate([np.concatenate([b0["index"], b1["index"]]) for b0, b1 in zip(*batches)])
  valid = np.concatenate([np.concatenate([b0["valid"], b1["valid"]]) for b0, b1 in zip(*batches)])
  np.testing.assert_array_equal(index[valid], np.arange(12))
  assert not valid[12:].any() and valid[:12].all()


def test_each_epoch_is_a_new_permutation_of_the_split(tiny_data, codec):
  options = pipeline.PipelineOptions(tiny_data, "train", batch_size=8, num_epochs=2)
  order = _indices(options, codec, 0, 1)
  first, second = order[:48], order[48:]
  assert sorted(first) == sorted(second) == list(range(48))
  assert not np.array_equal(first, second)


def test_features_are_normalised_and_tokenised(tiny_data, codec):
  options = pipeline.PipelineOptions(tiny_data, "train", batch_size=48, train=False)
  batch = next(iter(pipeline.build(options, codec)))
  assert batch["image"].shape == (48, 48, 48, 1) and batch["image"].dtype == np.float32
  assert abs(batch["image"].mean()) < 0.02 and abs(batch["image"].std() - 1) < 0.02
  source = builder.open_split(tiny_data, "train")
  record = records.from_example(source[int(batch["index"][5])])
  expected = codec.encode(record["caption"], record["spans"])
  np.testing.assert_array_equal(batch["text_ids"][5], expected.ids)
  np.testing.assert_array_equal(batch["keyword_mask"][5], expected.keyword_mask)
  np.testing.assert_array_equal(batch["clause_ids"][5], expected.clause_ids)


@pytest.mark.parametrize("axis", ["vertical", "horizontal"])
def test_flip_moves_image_and_text_together(tiny_data, axis):
  source = builder.open_split(tiny_data, "train")
  for i in range(len(source)):
    record = records.from_example(source[i])
    flipped = pipeline.flip(record, axis)
    records.validate_record(flipped)
    np.testing.assert_array_equal(flipped["image"], np.flip(record["image"], 0 if axis == "vertical" else 1))
    for name, before, after in zip(record["field_names"], record["keywords"], flipped["keywords"]):
      assert after == knowledge.flip_keyword(record["scene_type"], name, before, axis)
    assert pipeline.flip(flipped, axis)["caption"] == record["caption"]


def test_batch_not_divisible_by_hosts_is_a_config_error(tiny_data, codec):
  with pytest.raises(ConfigError, match="multiple of the process count"):
    pipeline.build(pipeline.PipelineOptions(tiny_data, "train", batch_size=5), codec,
                   process_index=0, process_count=2)


@pytest.mark.parametrize("field", ["worker_count", "read_threads"])
def test_negative_parallelism_is_a_config_error(tiny_data, codec, field):
  with pytest.raises(ConfigError, match=f"{field}=-1 must be >= 0"):
    pipeline.build(pipeline.PipelineOptions(tiny_data, "train", batch_size=8, **{field: -1}), codec)


def test_global_batch_is_sharded_over_the_batch_axes(tiny_data, codec):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  options = pipeline.PipelineOptions(tiny_data, "train", batch_size=8)
  local = next(iter(pipeline.build(options, codec)))
  batch = pipeline.global_batch(local, mesh)
  image = batch["image"]
  assert image.shape == (8, 48, 48, 1)
  assert image.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  assert {s.data.shape[0] for s in image.addressable_shards} == {2}
  np.testing.assert_array_equal(np.asarray(image), local["image"])


_RESUME_SCRIPT = """
import json, sys
import numpy as np
from klip_jax.data import pipeline
from klip_jax.data.tokenizer import TextCodec
data, tok, workers, state, out = sys.argv[1:]
options = pipeline.PipelineOptions(data, "train", batch_size=8, seed=5, worker_count=int(workers))
it = iter(pipeline.build(options, TextCodec(tok, 96)))
it.set_state(json.loads(open(state).read()))
batches = [next(it) for _ in range(4)]
np.savez(out, **{f"{k}{i}": b[k] for i, b in enumerate(batches) for k in ("index", "image", "text_ids")})
"""


@pytest.mark.slow  # a subprocess resume
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_new_process_continues_exactly(tiny_data, tiny_tokenizer, codec, tmp_path, workers):
  options = pipeline.PipelineOptions(tiny_data, "train", batch_size=8, seed=5, worker_count=workers)
  it = iter(pipeline.build(options, codec))
  for _ in range(7):  # crosses the first epoch boundary (6 batches per epoch)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  (tmp_path / "state.json").write_text(json.dumps(state))
  subprocess.run([sys.executable, "-c", _RESUME_SCRIPT, tiny_data, tiny_tokenizer, str(workers),
                  str(tmp_path / "state.json"), str(tmp_path / "out.npz")], check=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
  resumed = np.load(tmp_path / "out.npz")
  for i, batch in enumerate(expected):
    for key in ("index", "image", "text_ids"):
      np.testing.assert_array_equal(resumed[f"{key}{i}"], batch[key])


def _clause_keywords(codec, ids) -> list[str]:
  return codec.decode(ids).split(knowledge.SEPARATOR)


def test_clause_negatives_differ_from_their_caption_in_exactly_one_clause(tiny_data, codec):
  options = pipeline.PipelineOptions(tiny_data, "train", 16, seed=1, clause_negatives=True)
  batch = next(iter(pipeline.build(options, codec)))
  changed = []
  for ids, neg in zip(batch["text_ids"], batch["neg_text_ids"]):
    clauses, wrong = _clause_keywords(codec, ids), _clause_keywords(codec, neg)
    assert len(clauses) == len(wrong) == 8
    changed.append([k for k in range(8) if clauses[k] != wrong[k]])
  assert all(len(c) == 1 for c in changed), changed
  assert len({c[0] for c in changed}) > 3  # the swapped clause varies


def _plausible(scene_type: str, field: str, value: str) -> bool:
  covers, cells = knowledge.COVER_NAMES, knowledge.CELL_NAMES
  if field == "region":
    return value in {f"{c.name}, {c.country}".lower() for c in gazetteer.CITIES}
  if field == "location":
    return all(name in cells for name in knowledge._split_words(value))
  if field == "boundary":
    a, _, b = value.partition(" and ")
    return a in covers and b in covers
  if (scene_type, field) == ("landform", "distribution"):
    cover, _, cell = value.partition(" mainly in the ")
    return cover in covers and cell in cells
  return value in knowledge._VOCABULARY[(scene_type, field)]


def test_clause_negative_values_are_plausible_wrong_values_of_the_field(tiny_data):
  source = builder.open_split(tiny_data, "train")
  rng = np.random.default_rng(0)
  for i in range(len(source)):
    r = records.from_example(source[i], decode_rasters=False)
    caption, spans, k = knowledge.clause_negative(r["scene_type"], r["field_names"], r["keywords"],
                                                  r["caption"], r["spans"], rng)
    new = [caption[a:b] for a, b in spans]
    assert [j for j in range(8) if new[j] != r["keywords"][j]] == [k]
    field, old = r["field_names"][k], r["keywords"][k]
    if field in ("count", "size"):  # a nearby number: one or two steps away, never below 1
      assert int(new[k]) >= 1 and int(new[k]) != int(old)
    else:  # another value a caption of that field can hold
      assert new[k] != old and _plausible(r["scene_type"], field, new[k]), (field, new[k])
    # Everything outside the changed keyword is the original text.
    a, b = r["spans"][k]
    assert caption[:spans[k][0]] == r["caption"][:a] and caption[spans[k][1]:] == r["caption"][b:]


def test_clause_dropout_removes_one_clause_at_the_configured_rate(tiny_data, codec):
  options = pipeline.PipelineOptions(tiny_data, "train", 48, seed=2, clause_dropout=0.5, flip=False)
  batches = iter(pipeline.build(options, codec))
  counts = [len(_clause_keywords(codec, ids)) for _ in range(4) for ids in next(batches)["text_ids"]]
  assert set(counts) <= {7, 8}
  assert abs(np.mean(np.asarray(counts) == 7) - 0.5) < 0.12  # 192 draws: 0.5 +- 3.5 sigma


@pytest.mark.parametrize("location", ["top left corner", "upper-left", "the west side of the harbour"])
def test_a_record_whose_positions_are_free_text_is_not_flipped(location):
  # A real caption's location in its own words: flipping the image alone would make it false.
  keywords = ["2", location, "north-south", "150", "cargo ships", "scattered across the scene", "qingdao, china",
              "a coastal harbour"]
  caption, spans = knowledge.verbalise("target", keywords, [0] * 8)
  record = {"image": np.arange(16, dtype=np.uint16).reshape(4, 4), "scene_type": "target",
            "field_names": list(knowledge.FIELDS["target"]), "keywords": keywords, "caption": caption,
            "spans": np.asarray(spans, np.int32)}
  for axis in ("vertical", "horizontal"):
    assert pipeline.flip(record, axis) is record
  templated = dict(record, keywords=keywords[:1] + ["upper left"] + keywords[2:])
  templated["caption"], spans = knowledge.replace_keywords(caption, spans, templated["keywords"])
  templated["spans"] = np.asarray(spans, np.int32)
  flipped = pipeline.flip(templated, "horizontal")
  assert flipped["keywords"][1] == "upper right"
  np.testing.assert_array_equal(flipped["image"], templated["image"][:, ::-1])
