"""Evaluation of real data without synthetic truth: an ingested dataset of free-text field
records (no land cover, no boxes, no recorded corruption) gets every task it cannot score
skipped with the true reason, before any model call; VQA reads answers that fit free text or
says why it cannot; the stdout table shows the reasons; `klip captions diff` claims no truth."""

import json
import os

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from klip_jax import cli
from klip_jax import config as config_lib
from klip_jax.data import builder, ingest, prepare
from klip_jax.data.prepare import RunData
from klip_jax.data.tokenizer import TextCodec
from klip_jax.eval import registry, report, truth, vqa
from klip_jax.train import scio

GEO = {"platform": "Sentinel-1", "band": "C", "polarization": "VV", "incidence_deg": 38.0, "looks": 1,
       "acquired": "2021-06-30", "city": "Qingdao", "country": "China"}
TERRAINS = ["a coastal plain", "rolling hills", "a river delta", "an alluvial fan", "a karst plateau",
            "terraced slopes", "a tidal flat", "a glacial valley", "a salt marsh", "a volcanic field",
            "a sand dune field", "a mangrove coast", "a loess plateau", "a floodplain", "a fjord",
            "a peat bog", "an atoll", "a moraine"]
COUNTS = ["three container vessels", "Two container vessels", "12 container vessels", "one container vessel"]


def _landform(i):
  return {"Terrain": f"The terrain is classified as {TERRAINS[i]}, with fields and villages",
          "Functionality": "agriculture and fishing", "Distribution": "farmland covers most of the scene",
          "Layout": "scattered parcels along the roads", "Boundary": "water and farmland",
          "Buildings": "sparse houses", "Roads": "a few narrow roads", "Water": "a winding river"}


def _target(i):
  return {"Count": COUNTS[i // 2 % 4], "Location": "the top-left corner and the center",
          "Feature": "bright hulls oriented east-west", "Size": "about 150 metres",
          "Category": "container vessels", "Distribution": "moored side by side",
          "Region": "Qingdao, China", "Environment": "a coastal harbour"}


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
  """Ingested chips whose text is free-text field records: train 8, val 4, test 6; half landform."""
  folder = tmp_path_factory.mktemp("real")
  (folder / "chips").mkdir()
  rows, i = [], 0
  for split, n in (("train", 8), ("val", 4), ("test", 6)):
    for k in range(n):
      data = np.random.default_rng(i).integers(1, 5000, (32, 32)).astype(np.uint16)
      with rasterio.open(folder / "chips" / f"{i}.tif", "w", driver="GTiff", height=32, width=32, count=1,
                         dtype=data.dtype, crs="EPSG:32651",
                         transform=from_origin(500000.0 + 96 * i, 3990000.0, 3.0, 3.0)) as dst:
        dst.write(data, 1)
      text = _landform(i) if k % 2 == 0 else _target(i)
      rows.append({"split": split, "image_id": f"c{i}", "image": f"chips/{i}.tif", "geo": GEO, **text})
      i += 1
  manifest = folder / "m.jsonl"
  manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
  data_dir = str(folder / "data")
  builder.build(data_dir, ingest.ManifestSource(str(manifest)))
  tokenizer = str(folder / "tok.model")
  prepare.train_tokenizer(data_dir, 400, tokenizer)
  return data_dir, tokenizer


class NoModel:
  """A runner whose every call fails: a skip must be decided from the data alone."""

  def __getattr__(self, name):
    raise AssertionError(f"the model was called ({name}) for a task that cannot be scored")


def _context(real_data):
  data_dir, tokenizer = real_data
  config = config_lib.load("configs/tiny.py")
  data = RunData(data_dir, TextCodec(tokenizer, 128))
  examples = registry.Examples(config, data, "test", 0)
  return registry.EvalContext(config, data, NoModel(), examples, progress=False)


SKIPS = {
    "zeroshot_landcover": "no land-cover masks in the test split: none of its chips records truth.landcover",
    "segmentation": "no land-cover masks in the test split",
    "target_classification": "no target boxes in the test split: none of its chips records truth.boxes",
    "positioning": "no target boxes in the test split",
    "detection": "no target boxes in the test split",
    "screening": "none of the first 4 val captions records a corrupted clause: ingested captions carry no record "
                 "of which clause is wrong",
    "scio_repair": "none of the first 8 train captions records a corrupted clause: ingested captions",
    "vqa_landform": "the terrain answers are free text here: 3 of 3 test answers (e.g. 'loess plateau') are not among "
                    "the 4 most frequent train answers (4 distinct in 4 train chips)",
    "vqa_recognition": "none of the 3 target chips of the test split has a category keyword that answers it: the "
                       "question reads a target class (fishing boats, cargo ships, tankers, fighter jets, transport "
                       "aircraft, airliners) (e.g. 'container vessels')",
    "vqa_region_landform": "none of the 3 landform chips of the test split has a distribution keyword that answers "
                           "it: the question reads '<land cover> mainly in the <cell>' (e.g. 'farmland covers most "
                           "of the scene')",
}


def test_unscorable_tasks_are_skipped_with_their_reason_before_any_model_call(real_data):
  ctx = _context(real_data)
  results, details = registry.evaluate(ctx, list(SKIPS))
  assert results == {task: {"skipped": 1.0} for task in SKIPS}
  for task, reason in SKIPS.items():
    assert details[task]["skipped"].startswith(reason), (task, details[task]["skipped"])

  # The reasons reach the table printed on stdout through the results alone (as `klip eval` prints it).
  out = {"step": 7, "tasks": results, "skipped": {t: d["skipped"] for t, d in details.items()}}
  table = report.table(out, {})
  assert f"| vqa_landform | skipped: {details['vqa_landform']['skipped']} | | | |" in table
  assert "| zeroshot_landcover | skipped: no land-cover masks in the test split" in table


def test_vqa_answers_fit_free_text(real_data):
  ctx = _context(real_data)
  kwargs = {"max_questions": 100, "max_candidates": 32}
  count = vqa.plan("vqa_count", ctx.test, ctx.train, **kwargs)
  # Test targets c13, c15, c17 say "12", "one" and "three" container vessels.
  assert [answer for _, answer, _ in count.asked] == ["12", "1", "3"]
  assert sorted(count.candidates) == ["1", "12", "2", "3"]
  position = vqa.plan("vqa_position", ctx.test, ctx.train, **kwargs)  # "top-left corner and the center"
  assert {answer for _, answer, _ in position.asked} == {"upper left and centre"}
  present = vqa.plan("vqa_landforms_present", ctx.test, ctx.train, **kwargs)  # "water and farmland"
  assert {answer for _, answer, _ in present.asked} == {"water and vegetation"}


def test_corruption_missing_on_synthetic_data(tiny_data):
  assert truth.corruption_missing(tiny_data, "train", 48) is None  # the world records its noise


def _workdir(tmp_path, data_dir, tokenizer, entries):
  workdir = str(tmp_path / "run")
  c = config_lib.load("configs/tiny.py")
  c.data.update(data_dir=data_dir, tokenizer=tokenizer)
  os.makedirs(os.path.dirname(scio.overlay_path(workdir, 1)))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort())
  with open(scio.overlay_path(workdir, 1), "w") as f:
    f.write("".join(json.dumps(e) + "\n" for e in entries))
  return workdir


def _entry(truth_of_clauses):
  return {"id": "c0", "caption": "first clause$second clause about water", "flagged": 1,
          "original_keyword": "water", "corrected_keyword": "sea", "truth": truth_of_clauses}


def test_captions_diff_claims_no_truth_without_it(real_data, tiny_data, tiny_tokenizer, tmp_path, capsys):
  workdir = _workdir(tmp_path / "real", *real_data, [_entry({})])
  assert cli.main(["captions", "diff", "--workdir", workdir, "--round", "1"]) == 0
  printed = capsys.readouterr().out
  assert "(was correct)" not in printed and "true:" not in printed
  assert "original: 'water'  corrected: 'sea'" in printed
  assert "no true keywords: this data records no corrupted clauses" in printed
  # Synthetic data records its noise: a clean clause was correct, a corrupted one has its truth.
  workdir = _workdir(tmp_path / "synth", tiny_data, tiny_tokenizer, [_entry({}), _entry({"1": "open sea"})])
  assert cli.main(["captions", "diff", "--workdir", workdir, "--round", "1"]) == 0
  printed = capsys.readouterr().out
  assert "true: 'water' (was correct)" in printed and "true: 'open sea'" in printed
  assert "no true keywords" not in printed
