"""The SCIO ablation's arms and its summary statistics (the runs themselves are the
benchmark's job: `klip ablate scio`)."""

import json
import os
import shutil

import numpy as np
import pytest
from scipy import stats

from klip_jax import config as config_lib
from klip_jax.errors import ConfigError
from klip_jax.eval import registry
from klip_jax.jobs import ablate


def test_mean_ci_is_the_student_t_interval_of_the_mean():
  values = [0.2, 0.25, 0.3]
  m, lo, hi = ablate.mean_ci(values)
  half = 4.302652729911275 * np.std(values, ddof=1) / np.sqrt(3)  # t(0.975, df=2), from tables
  assert m == pytest.approx(0.25)
  assert (lo, hi) == pytest.approx((0.25 - half, 0.25 + half))
  assert stats.t.ppf(0.975, 2) == pytest.approx(4.302652729911275)
  assert ablate.mean_ci([0.4]) == (0.4, 0.4, 0.4)
  assert all(np.isnan(ablate.mean_ci([None])))


def test_arms_share_steps_seed_data_and_differ_only_where_named():
  config = config_lib.load("configs/demo.py")
  arms = {arm: ablate.arm_config(config, arm, 2, "/d", "/t.model") for arm in ablate.ARMS}
  steps, stage_b = config.train.steps, config.scio.stage_b_steps
  assert steps == config.scio.stage_a_steps + stage_b + config.scio.stage_c_steps and stage_b > 0
  for c in arms.values():
    assert c.train.steps == steps and c.seed == 2 and c.data.data_dir == "/d"
    config_lib.validate(c)  # every arm's switches go together (a rewrite bar needs a rule with units)
  a = arms["stage_a"].scio
  assert (a.stage_a_steps, a.stage_b_steps, a.stage_c_steps) == (steps, 0, 0)
  paper, extended = arms["paper"], arms["extended"]
  assert paper.scio.rule == "paper" and not paper.data.clause_negatives
  assert extended.scio.rule == "decoder" and extended.loss.itm_random_negatives > 0 and extended.scio.candidates
  assert arms["stage_a_extended"].loss.itm_random_negatives > 0 and arms["stage_a_extended"].scio.stage_b_steps == 0
  assert paper.scio.stage_b_steps == extended.scio.stage_b_steps == stage_b
  with pytest.raises(ConfigError, match="unknown arm"):
    ablate.arm_config(config, "nope", 0, "", "")


def test_summary_table_reports_every_arm_with_its_chance_level():
  result = lambda r: {"tasks": {"retrieval": {"r_mean": r, "chance_r_mean": 0.04}}}
  table = ablate.summarise({"stage_a": [result(0.2), result(0.3)], "paper": [result(0.5), result(0.5)]})
  row = table["retrieval/r_mean"]
  assert row["stage_a"]["mean"] == pytest.approx(0.25) and row["paper"]["lo"] == pytest.approx(0.5)
  assert row["chance"] == pytest.approx(0.04)
  assert np.isnan(table["itm/auc"]["paper"]["mean"])  # a task not run: n/a, not zero
  text = ablate.markdown(table, ["stage_a", "paper"], 2)
  assert "| retrieval/r_mean | 0.040 | 0.250 [" in text and "n/a" in text


def test_a_chance_level_that_differs_between_arms_is_given_per_arm():
  # Recall's chance is as many clauses as the arm flagged, picked at random: 1 flag a caption
  # (paper) against up to 4 (extended). A mean over arms (0.115) would be nobody's chance.
  result = lambda recall, chance: {"tasks": {"scio_repair": {"screening_recall": recall,
                                                             "chance_screening_recall": chance}}}
  runs = {"paper": [result(0.10, 0.04), result(0.11, 0.06)], "extended": [result(0.60, 0.18), result(0.62, 0.18)]}
  row = ablate.summarise(runs)["scio_repair/screening_recall"]
  assert row["chance"] is None
  assert row["paper"]["chance"] == pytest.approx(0.05) and row["extended"]["chance"] == pytest.approx(0.18)
  line = next(l for l in ablate.markdown(ablate.summarise(runs), list(runs), 2).splitlines() if "recall" in l)
  assert line.startswith("| scio_repair/screening_recall | per arm | 0.105 [")
  assert "(chance 0.050)" in line and "(chance 0.180)" in line


def test_paired_differences_cancel_what_a_seed_shares():
  result = lambda r: {"tasks": {"retrieval": {"r_mean": r}}}
  # Seeds spread 0.1-0.3 in both arms; the arm is better by 0.02, 0.03, 0.04 on the same seeds.
  runs = {"stage_a": [result(0.1), result(0.2), result(0.3)],
          "extended": [result(0.12), result(0.23), result(0.34)]}
  row, paired = ablate.summarise(runs)["retrieval/r_mean"], ablate.paired_differences(runs)["retrieval/r_mean"]
  assert row["extended"]["lo"] < row["stage_a"]["hi"]  # the arms' own intervals overlap
  half = 4.302652729911275 * 0.01 / np.sqrt(3)  # t(0.975, 2) x sd of (0.02, 0.03, 0.04) / sqrt(3)
  assert paired["extended"]["mean"] == pytest.approx(0.03)
  assert (paired["extended"]["lo"], paired["extended"]["hi"]) == pytest.approx((0.03 - half, 0.03 + half))
  assert "stage_a" not in paired and np.isnan(ablate.paired_differences(runs)["itm/auc"]["extended"]["mean"])
  text = ablate.markdown(ablate.summarise(runs), ["stage_a", "extended"], 3, ablate.paired_differences(runs))
  assert "| retrieval/r_mean | +0.030 [+0.005, +0.055] *" in text


def test_each_extension_arm_turns_back_exactly_its_own_switch():
  config = config_lib.load("configs/demo.py")
  extended = ablate.arm_config(config, "extended", 0, "/d", "/t.model")
  flat = lambda c: {path: c[path.split(".")[0]][path.split(".")[1]] for path in ablate.PAPER}
  for name, paths in ablate.EXTENSIONS.items():
    c = flat(ablate.arm_config(config, f"extended-no_{name}", 0, "/d", "/t.model"))
    changed = {p for p in ablate.PAPER if c[p] != flat(extended)[p]}
    assert changed == set(paths), name
    assert all(c[p] == ablate.PAPER[p] for p in paths)
  plus = flat(ablate.arm_config(config, "extended+clause_negatives", 0, "/d", "/t.model"))
  assert {p for p in ablate.PAPER if plus[p] != flat(extended)[p]} == {"data.clause_negatives"}


class _Stop(Exception):
  pass


@pytest.mark.parametrize("named", [True, False])
def test_every_arm_trains_with_the_tokenizer_the_run_data_read(named, tiny_data, tiny_tokenizer, tmp_path,
                                                               monkeypatch):
  # The arms used WORKDIR/tokenizer.model whatever config.data.tokenizer said, so with a named
  # tokenizer each arm trained a tokenizer of its own instead of reading the user's.
  config = config_lib.load("configs/demo.py")
  config.data.update(data_dir=tiny_data, tokenizer=tiny_tokenizer if named else "")
  seen = []

  def train(c, run_dir, progress=True):
    seen.append(c.data.tokenizer)
    raise _Stop

  monkeypatch.setattr(ablate.train_job, "train", train)
  with pytest.raises(_Stop):
    ablate.ablate(config, str(tmp_path), seeds=1, arms=["stage_a"], progress=False)
  assert seen == [tiny_tokenizer if named else str(tmp_path / "tokenizer.model")]
  assert (tmp_path / "tokenizer.model").exists() != named  # trained only when none was named


def test_a_rerun_with_changed_settings_refuses_the_old_results(tiny_data, tiny_tokenizer, tmp_path, monkeypatch):
  # A finished run (config.json from training, eval/results.json) was summarised as the new
  # settings' whatever changed: the rerun reported the old lr's results under the new lr.
  config = config_lib.load("configs/demo.py")
  config.data.update(data_dir=tiny_data, tokenizer=tiny_tokenizer)
  trained = []

  def train(c, run_dir, progress=True):
    trained.append(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    open(os.path.join(run_dir, "config.json"), "w").write(c.to_json_best_effort(indent=2))

  def evaluate(c, run_dir, progress=True):
    os.makedirs(os.path.join(run_dir, "eval"))
    json.dump({"tasks": {"retrieval": {"r_mean": 0.2, "chance_r_mean": 0.02}}},
              open(os.path.join(run_dir, "eval", "results.json"), "w"))

  monkeypatch.setattr(ablate.train_job, "train", train)
  monkeypatch.setattr(ablate.suite, "run", evaluate)
  ablate.ablate(config, str(tmp_path), seeds=1, arms=["stage_a"], progress=False)
  ablate.ablate(config, str(tmp_path), seeds=1, arms=["stage_a"], progress=False)  # unchanged: reused
  assert len(trained) == 1
  config.optim.lr = 0.5
  with pytest.raises(ConfigError, match=r"stage_a/seed_0 holds the results of another config: optim\.lr "
                                        r"\(0\.002 then, 0\.5 now\).*delete"):
    ablate.ablate(config, str(tmp_path), seeds=1, arms=["stage_a"], progress=False)
  assert len(trained) == 1


def test_results_a_later_eval_measured_with_other_settings_are_refused(tiny_data, tiny_tokenizer, tmp_path,
                                                                       monkeypatch):
  # `klip eval --workdir RUN --tasks itm --config.eval.test_examples=100` merges into the run's
  # results.json; the ablation then averaged that itm with the other seeds' full-split ones.
  config = config_lib.load("configs/demo.py")
  config.data.update(data_dir=tiny_data, tokenizer=tiny_tokenizer)
  measured = {}

  def train(c, run_dir, progress=True):
    os.makedirs(run_dir, exist_ok=True)
    open(os.path.join(run_dir, "config.json"), "w").write(c.to_json_best_effort(indent=2))

  def evaluate(c, run_dir, progress=True):
    os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
    settings = {t: registry.settings(c, t) for t in ("retrieval", "itm")}
    settings["itm"].update(measured)
    json.dump({"tasks": {"retrieval": {"r_mean": 0.2}, "itm": {"auc": 0.6}}, "settings": settings},
              open(os.path.join(run_dir, "eval", "results.json"), "w"))

  monkeypatch.setattr(ablate.train_job, "train", train)
  monkeypatch.setattr(ablate.suite, "run", evaluate)
  ablate.ablate(config, str(tmp_path), seeds=1, arms=["stage_a"], progress=False)  # as configured: summarised
  measured["eval.test_examples"] = 100
  shutil.rmtree(tmp_path / "stage_a")
  with pytest.raises(ConfigError, match=r"stage_a/seed_0/eval/results\.json: itm was evaluated with "
                                        r"eval\.test_examples 100 \(the arm's: 0\)"):
    ablate.ablate(config, str(tmp_path), seeds=1, arms=["stage_a"], progress=False)
