"""Where `klip eval` writes: a later run never loses an earlier benchmark. Runs of the step
WORKDIR/eval/ holds merge into it task by task, an older step goes to eval/step_<S>/, and a
newer latest checkpoint moves eval/'s benchmark aside first (suite.py's module docstring). The
model, data and checkpoints are stubbed: what is tested is the bookkeeping, in milliseconds."""

import json
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest

from klip_jax import config as config_lib
from klip_jax.eval import registry, report, suite


class _Context:
  """Stands in for registry.EvalContext: the parameters it evaluates, and what tasks leave."""

  def __init__(self, *args, params="trained", **kwargs):
    self.params, self.outputs, self.test = params, {}, "test chips"

  def with_params(self, params):
    return _Context(params=params)


@pytest.fixture
def fake(monkeypatch):
  """Stubs run()'s model, data and checkpoints; `fake.latest` is the latest checkpoint step and
  `fake.scores[task]` the accuracy the trained model gets (the random init gets a tenth)."""
  state = SimpleNamespace(latest=8, scores={})
  monkeypatch.setattr(suite.prepare, "locate", lambda c, w: SimpleNamespace(codec=SimpleNamespace(vocab_size=10)))
  monkeypatch.setattr(suite.mesh_lib, "from_config", lambda mesh: None)
  monkeypatch.setattr(suite.checkpoint, "restore", lambda c, w, v, m, step=None: (
      None, SimpleNamespace(step=state.latest if step is None else step, params="trained")))
  monkeypatch.setattr(suite.checkpoint, "latest_step", lambda c, w: state.latest)
  monkeypatch.setattr(suite, "TokenIds", SimpleNamespace(from_codec=lambda codec: None))
  monkeypatch.setattr(suite, "ModelRunner", lambda *args: None)
  monkeypatch.setattr(suite.state_lib, "make_optimizer", lambda optim, steps: (None, None))
  monkeypatch.setattr(suite.state_lib, "create", lambda c, v, tx, mesh: (None, SimpleNamespace(params="fresh"), None))
  monkeypatch.setattr(registry, "Examples", lambda *args: None)
  monkeypatch.setattr(registry, "EvalContext", _Context)
  monkeypatch.setattr(report, "_retrieval_grid", lambda test, scores: plt.figure(figsize=(1, 1)))

  def evaluate(ctx, tasks):
    scale = 1.0 if ctx.params == "trained" else 0.1
    if "retrieval" in tasks and ctx.params == "trained":
      ctx.outputs["i2t_scores"] = [[1.0]]
    return ({t: {"accuracy": state.scores[t] * scale, "chance_accuracy": 0.25} for t in tasks},
            {t: {"question": f"{t} at {state.scores[t]}"} for t in tasks})

  monkeypatch.setattr(registry, "evaluate", evaluate)
  return state


def _run(workdir, tasks, step=None):
  c = config_lib.default_config()
  c.eval.tasks = tasks
  return suite.run(c, str(workdir), step=step, progress=False)


def _read(path):
  return json.loads(path.read_text())


def test_a_task_rerun_merges_into_the_steps_benchmark(fake, tmp_path):
  fake.scores = {"retrieval": 0.5, "itm": 0.6, "vqa_count": 0.7}
  full = _run(tmp_path, "retrieval,itm,vqa_count")
  folder = tmp_path / "eval"
  assert _read(folder / "results.json") == full and (folder / "retrieval.png").exists()

  fake.scores["itm"] = 0.9  # `klip eval --tasks itm`: itm is replaced, the rest stays
  merged = _run(tmp_path, "itm")
  saved = _read(folder / "results.json")
  assert saved == merged and saved["step"] == 8
  assert list(saved["tasks"]) == ["retrieval", "itm", "vqa_count"]
  assert saved["tasks"]["itm"]["accuracy"] == 0.9 and saved["tasks"]["retrieval"] == full["tasks"]["retrieval"]
  assert saved["random_init"]["itm"]["accuracy"] == pytest.approx(0.09)
  assert saved["random_init"]["vqa_count"] == full["random_init"]["vqa_count"]
  details = _read(folder / "details.json")
  assert details["itm"]["question"] == "itm at 0.9" and details["vqa_count"]["question"] == "vqa_count at 0.7"
  text = (folder / "report.md").read_text()  # written again from the merged results
  assert all(f"| {t} | accuracy |" in text for t in ("itm", "vqa_count")) and "| retrieval |" in text
  assert "| itm | accuracy | 0.900 | 0.090 | 0.250 |" in text
  assert "(retrieval.png)" in text and (folder / "retrieval.png").exists()  # still the retrieval entry's plot


def test_other_steps_never_overwrite_the_latest_benchmark(fake, tmp_path):
  fake.scores = {"retrieval": 0.5, "itm": 0.6}
  _run(tmp_path, "retrieval,itm")
  folder = tmp_path / "eval"
  latest = (folder / "results.json").read_text()

  older = _run(tmp_path, "itm", step=4)  # `klip eval --step 4`: a folder of its own
  assert (folder / "results.json").read_text() == latest
  assert _read(folder / "step_4" / "results.json") == older and older["step"] == 4
  assert list(older["tasks"]) == ["itm"] and (folder / "step_4" / "report.md").exists()
  assert suite.results_folder(str(tmp_path), 4) == folder / "step_4"
  assert suite.results_folder(str(tmp_path), 8) == folder

  fake.latest, fake.scores = 12, {"itm": 0.8}  # trained on: the latest step's benchmark takes eval/
  _run(tmp_path, "itm")
  assert _read(folder / "results.json")["step"] == 12 and list(_read(folder / "results.json")["tasks"]) == ["itm"]
  assert (folder / "step_8" / "results.json").read_text() == latest  # moved aside whole, not lost
  assert {p.name for p in (folder / "step_8").iterdir()} >= {"details.json", "report.md", "retrieval.png"}
  assert not (folder / "retrieval.png").exists()  # step 8's plot went with it: no stale file beside step 12's
  assert _read(folder / "step_4" / "results.json") == older
  assert suite.results_folder(str(tmp_path), 8) == folder / "step_8"


def test_merge_replaces_a_rerun_task_whole():
  same, other = {"eval.seed": 0}, {"eval.seed": 1}
  previous = {"step": 3, "tasks": {"segmentation": {"skipped": 1.0}, "itm": {"auc": 0.6}, "detection": {"map50": 0.2}},
              "skipped": {"segmentation": "no masks"},
              "random_init": {"itm": {"auc": 0.5}, "segmentation": {"miou": 0.1}, "detection": {"map50": 0.1}},
              "settings": {"segmentation": same, "itm": same, "detection": same}}
  # segmentation and detection run again with eval.random_baseline off, detection with another seed
  out = {"step": 3, "tasks": {"segmentation": {"miou": 0.4}, "detection": {"map50": 0.3}},
         "settings": {"segmentation": same, "detection": other}}
  merged = suite.merge(previous, out, ["segmentation", "detection"])
  assert merged == {"step": 3,
                    "tasks": {"itm": {"auc": 0.6}, "segmentation": {"miou": 0.4}, "detection": {"map50": 0.3}},
                    "settings": {"itm": same, "segmentation": same, "detection": other},
                    # detection's row was measured with the other seed: dropped, not shown beside the new score
                    "random_init": {"itm": {"auc": 0.5}, "segmentation": {"miou": 0.1}}}
  assert suite.merge(None, out, ["segmentation"]) is out


def test_tasks_measured_with_other_settings_are_named_in_the_report(fake, tmp_path):
  fake.scores = {"retrieval": 0.5, "itm": 0.6, "vqa_count": 0.7}
  _run(tmp_path, "retrieval,itm,vqa_count")
  folder = tmp_path / "eval"
  assert "different settings" not in (folder / "report.md").read_text()
  saved = _read(folder / "results.json")["settings"]
  assert saved["itm"]["eval.test_examples"] == 0 and "eval.every" not in saved["itm"]  # scheduling: not a setting

  c = config_lib.default_config()
  c.eval.update(tasks="itm", test_examples=100, random_baseline=False)  # a quick look at 100 test chips
  suite.run(c, str(tmp_path), progress=False)
  results = _read(folder / "results.json")
  assert results["settings"]["itm"]["eval.test_examples"] == 100
  assert results["settings"]["retrieval"]["eval.test_examples"] == 0
  assert "itm" not in results["random_init"] and "retrieval" in results["random_init"]  # measured on all chips
  text = (folder / "report.md").read_text()
  assert "| eval.test_examples | 0: retrieval, vqa_count; 100: itm |" in text
  assert text.count("| eval.") == 1  # only the setting that differs
  assert "not recorded" not in text


def test_tasks_of_a_results_file_without_settings_are_named(fake, tmp_path):
  fake.scores = {"retrieval": 0.5, "itm": 0.6}
  (tmp_path / "eval").mkdir()
  older = {"step": 8, "tasks": {"retrieval": {"accuracy": 0.4}, "itm": {"accuracy": 0.5}}}  # before settings
  (tmp_path / "eval" / "results.json").write_text(json.dumps(older))
  _run(tmp_path, "itm")
  text = (tmp_path / "eval" / "report.md").read_text()
  assert "The settings of retrieval were not recorded" in text and "from those of itm." in text


def test_a_task_records_the_settings_it_depends_on():
  c = config_lib.default_config()
  evals = {f"eval.{k}" for k in c.eval} - {f"eval.{k}" for k in ("tasks", "every", "at_steps", "periodic_examples",
                                                                   "batch_size", "random_baseline")}
  scio = {f"scio.{k}" for k in c.scio}
  losses = {f"loss.{k}" for k in c.loss}
  assert set(registry.settings(c, "retrieval")) == evals
  assert set(registry.settings(c, "screening")) == set(registry.settings(c, "scio_repair")) == evals | scio
  assert set(registry.settings(c, "heldout_loss")) == evals | losses | {"train.batch_size"}
  c.scio.rewrite_threshold = 2.5
  assert registry.settings(c, "scio_repair")["scio.rewrite_threshold"] == 2.5


def test_an_unreadable_results_file_is_kept_aside(fake, tmp_path):
  fake.scores = {"itm": 0.6}
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "results.json").write_text('{"step": 8, "tas')
  _run(tmp_path, "itm")
  assert (tmp_path / "eval" / "results.unreadable.json").read_text() == '{"step": 8, "tas'
  assert list(_read(tmp_path / "eval" / "results.json")["tasks"]) == ["itm"]


def test_a_workdir_whose_results_cannot_be_written_fails_before_evaluating(fake, tmp_path, monkeypatch):
  evaluated = []
  monkeypatch.setattr(registry, "evaluate", lambda ctx, tasks: evaluated.append(tasks))
  (tmp_path / "eval").write_text("a file where eval/ belongs")  # as unwritable as a read-only mount, also as root
  with pytest.raises(OSError):
    _run(tmp_path, "itm")
  assert evaluated == [] and (tmp_path / "eval").read_text() == "a file where eval/ belongs"
