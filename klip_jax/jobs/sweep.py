"""`klip sweep run`: train the points of a scaling-law sweep and record each in WORKDIR/sweep.jsonl.

A sweep config (`configs/sweeps/*.py`) holds one fixed run config (`base`, derived from the
shipped config `base_config`) and the axes: a model family (`models`: width and depth of BOTH
towers; heads = width / head_dim, MLP = mlp_ratio x width; optionally a model's own `init_std`
for both towers and its own peak `lr`, the per-size settings a family needs to be trained as
well at each size, as Kaplan et al. and Hoffmann et al. tuned theirs), train chips (nested subsets: a point
trains on the first n train chips of one world, `data.train_examples`), train steps, `scio`
(SCIO stages split as `scio_fractions`, or stage A only) and `noise` (the world's caption noise
rate; one world per rate). Points are the `grid`'s product, or the explicit `points` list.
Each point is named m<k>_d<chips>_s<steps> (+ _scio, + _n<rate> when the sweep has several
rates) and is an ordinary workdir, WORKDIR/points/<name>/ (`klip eval` works on it); all of them
share WORKDIR/worlds/noise_<rate>/ and one tokenizer, WORKDIR/tokenizer.model, trained on the
first point's world. Compiled programs persist in WORKDIR/xla_cache, so points of one model
size compile once.

Every point evaluates `heldout_loss` and `retrieval` on the same first `eval.periodic_examples`
val chips at `evals` log-spaced steps, the last at the end (the worlds of different noise rates
hold the same chips, the noise changes captions only, and the held-out loss reads the true
captions: every point is scored on the same examples). Its sweep.jsonl line (the last line
of a name wins; the file is rewritten whole, atomically, per line):
  point, status ("done" / "failed"), error ("Type: message" / null), config_hash (sha256 of the
  point's resolved config without its data and tokenizer locations), data (what the point trained
  on, wherever it lies: `data.prepare.fingerprint`'s dataset and tokenizer sha256), model, params {total,
  non_embedding} (`model.size`), train_chips, steps, batch_size, tokens_per_image
  (data.max_len), flops_per_step (XLA's cost analysis of the train step at the global batch),
  flops_6nd_per_step (6 x non_embedding x (patches + text tokens) x batch), scio, noise,
  evals [{step, images_seen, flops (flops_per_step x step), loss {itc, itm, reconstruction,
  total}}], r_mean (val retrieval at the end), r_mean_chance (the retrieval evaluator's chance_r_mean:
  r_mean of a random ranking, 1/3 over 16 val chips, 1/12 over 64, for reading a small r_mean), wall_s.

A rerun skips points recorded done with the same config hash and data, reruns a point whose
config or data changed (its old workdir removed first: the hash leaves the data's location out, so
another dataset or tokenizer at the same or another path is told apart by its fingerprint alone),
retries failed points, resumes an interrupted point from its checkpoint, and records a point whose
workdir already holds a finished run of its config and data (one trained elsewhere, e.g. from
`--emit-launch`'s commands) without training it.
wall_s is this process's time on the point; for such a collected point, the training time its
metrics log implies (steps over logged throughput).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import numbers
import os
import shlex
import sys
import time

import jax
import ml_collections

from klip_jax import config as config_lib
from klip_jax import io
from klip_jax.bench import flops
from klip_jax.data import builder, prepare, tokenizer
from klip_jax.errors import ConfigError, Preempted
from klip_jax.jobs import train as train_job
from klip_jax.model import size
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import state as state_lib

AXES = ("model", "train_chips", "steps", "scio", "noise")
TASKS = "heldout_loss,retrieval"
LOSSES = ("itc", "itm", "reconstruction", "total")  # the heldout_loss evaluator's keys


@dataclasses.dataclass(frozen=True)
class Point:
  model: str
  train_chips: int
  steps: int
  scio: bool
  noise: float


def points(sweep: ml_collections.ConfigDict) -> dict[str, Point]:
  """The sweep's points by name, in order: the explicit `points` list, else the `grid`'s product."""
  _check(sweep)
  base_noise = sweep.base.data.synth.noise_rate
  defaults = {"scio": False, "noise": base_noise}
  if sweep.get("points"):
    rows = [{**defaults, **dict(p)} for p in sweep.points]
  else:
    for axis, values in sweep.grid.items():
      if not isinstance(values, (list, tuple)):
        raise ConfigError(f"sweep.grid.{axis}={values!r}: give a list of values, e.g. [{values!r}].")
    grid = {axis: list(sweep.grid.get(axis) or ([defaults[axis]] if axis in defaults else [])) for axis in AXES}
    rows = [dict(zip(AXES, values)) for values in itertools.product(*(grid[a] for a in AXES))]
    if not rows:
      raise ConfigError(f"sweep.grid {grid}: give at least one value of model, train_chips and steps.")
  for row in rows:
    unknown = set(row) - set(AXES)
    if unknown or set(AXES) - set(row):
      raise ConfigError(f"sweep point {row}: give exactly {', '.join(AXES)} (model, train_chips and steps are "
                        "required; scio defaults to False, noise to base.data.synth.noise_rate).")
    if row["model"] not in sweep.models:
      raise ConfigError(f"sweep point {row}: no model {row['model']!r} in sweep.models ({', '.join(sweep.models)}).")
    _check_axes(row)
  several_noises = len({float(r["noise"]) for r in rows}) > 1
  if several_noises and sweep.base.data.data_dir:
    raise ConfigError("a noise axis needs the synthesised world, but base.data.data_dir names a dataset; "
                      "give one noise rate or no data_dir.")
  named: dict[str, Point] = {}
  for row in rows:
    p = Point(str(row["model"]), int(row["train_chips"]), int(row["steps"]), bool(row["scio"]), float(row["noise"]))
    name = f"{p.model}_d{p.train_chips}_s{p.steps}" + ("_scio" if p.scio else "") + (
        f"_n{p.noise:g}" if several_noises else "")
    if name in named:
      raise ConfigError(f"sweep point {name} is listed twice.")
    named[name] = p
  return named


MODEL_KEYS = frozenset({"width", "depth", "init_std", "lr"})


def _check_axes(row: dict) -> None:
  """Refuse a point's value that int(), bool() or float() would turn into another point without a
  word (32.7 chips trained as 32, scio "no" as SCIO on) or into a traceback: the point's name and
  its sweep.jsonl line must say what it trained."""
  whole = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
  for axis, ok, want in (("train_chips", lambda v: whole(v) and v > 0, "a whole number of chips > 0"),
                         ("steps", lambda v: whole(v) and v > 0, "a whole number of steps > 0"),
                         ("scio", lambda v: isinstance(v, bool), "True or False"),
                         ("noise", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v <= 1,
                          "a caption noise rate in [0, 1]")):
    if not ok(row[axis]):
      raise ConfigError(f"sweep point {row}: {axis}={row[axis]!r}; give {want}.")


def _check(sweep: ml_collections.ConfigDict) -> None:
  for key in ("base", "base_config", "models", "head_dim", "mlp_ratio", "evals", "scio_fractions"):
    if key not in sweep:
      raise ConfigError(f"the sweep config has no {key!r}; a sweep config holds base, base_config, models, "
                        "head_dim, mlp_ratio, evals, scio_fractions and a grid or points (configs/sweeps/micro.py).")
  if not sweep.get("points") and not sweep.get("grid"):
    raise ConfigError("the sweep config has neither points nor a grid.")
  for name, m in sweep.models.items():
    if set(m) - MODEL_KEYS or not {"width", "depth"} <= set(m):
      raise ConfigError(f"sweep.models.{name} = {dict(m)}: a model holds width and depth, and optionally "
                        "init_std and lr, nothing else.")
    if not (isinstance(sweep.head_dim, int) and sweep.head_dim > 0) or m.width % sweep.head_dim:
      raise ConfigError(f"sweep.models.{name}.width={m.width} is not a multiple of head_dim={sweep.head_dim} "
                        "(a whole number > 0).")
  if len(sweep.scio_fractions) != 3 or abs(sum(sweep.scio_fractions) - 1) > 1e-6:
    raise ConfigError(f"sweep.scio_fractions={tuple(sweep.scio_fractions)}: give stage A, B, C shares summing to 1.")
  if sweep.evals < 1:
    raise ConfigError(f"sweep.evals={sweep.evals}: evaluate at least once (at the end).")


def eval_steps(steps: int, evals: int) -> tuple[int, ...]:
  """`evals` log-spaced steps ending at `steps` (each half the next; fewer when steps is small)."""
  return tuple(sorted({max(1, round(steps / 2 ** k)) for k in range(evals)}))


def point_config(sweep: ml_collections.ConfigDict, p: Point, data_dir: str = "",
                 tokenizer_path: str = "") -> ml_collections.ConfigDict:
  """The run config of one point: the base with the point's axes applied."""
  c = sweep.base.copy_and_resolve_references()
  m = sweep.models[p.model]
  for tower in (c.model.vision, c.model.text):
    tower.update(width=m.width, depth=m.depth, heads=m.width // sweep.head_dim, mlp_dim=sweep.mlp_ratio * m.width)
    if "init_std" in m:
      tower.init_std = m.init_std
  if "lr" in m:
    c.optim.lr = m.lr
  c.data.train_examples = p.train_chips
  c.data.synth.noise_rate = p.noise
  c.data.data_dir = c.data.data_dir or data_dir
  c.data.tokenizer = c.data.tokenizer or tokenizer_path
  c.train.steps = p.steps
  if p.scio:
    a, b = (round(p.steps * f) for f in sweep.scio_fractions[:2])
    c.scio.update(stage_a_steps=a, stage_b_steps=b, stage_c_steps=p.steps - a - b)
  else:
    c.scio.update(stage_a_steps=0, stage_b_steps=0, stage_c_steps=0)
  c.eval.update(tasks=TASKS, every=0, at_steps=eval_steps(p.steps, sweep.evals), random_baseline=False)
  return c


def config_hash(config_json: dict) -> str:
  """sha256 of a run config as JSON (`to_json_best_effort` or a saved config.json), without the
  data and tokenizer locations: a run trained elsewhere on the same world hashes the same."""
  d = {**config_json, "data": {**config_json["data"], "data_dir": "", "tokenizer": ""}}
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _hash(c: ml_collections.ConfigDict) -> str:
  return config_hash(json.loads(c.to_json_best_effort()))


def flops_6nd(non_embedding: int, c: ml_collections.ConfigDict) -> float:
  """Kaplan et al.'s 6ND per step: 6 x N x tokens per step (image patches + text tokens of
  every example in the global batch)."""
  patches = (c.model.vision.image_size // c.model.vision.patch_size) ** 2
  return 6.0 * non_embedding * (patches + c.data.max_len) * c.train.batch_size


def line(name: str, p: Point, c: ml_collections.ConfigDict, *, data: dict, params: dict | None,
         flops_per_step: float | None, metrics: list[dict], wall_s: float, error: str | None = None) -> dict:
  """The sweep.jsonl line of a point (`error`: failed) from its config and metrics.jsonl lines."""
  evals, retrieval = [], {}
  for entry in metrics:
    held = entry.get("eval", {}).get("heldout_loss")
    if held and "total" in held:
      s = int(entry["step"])
      evals.append({"step": s, "images_seen": s * c.train.batch_size,
                    "flops": None if flops_per_step is None else flops_per_step * s,
                    "loss": {key: float(held[key]) for key in LOSSES}})
      retrieval = entry["eval"].get("retrieval") or retrieval
  r_mean, chance = retrieval.get("r_mean"), retrieval.get("chance_r_mean")
  return {"point": name, "status": "failed" if error else "done", "error": error, "config_hash": _hash(c),
          "data": data, "model": p.model, "params": params, "train_chips": p.train_chips, "steps": p.steps,
          "batch_size": c.train.batch_size, "tokens_per_image": c.data.max_len, "flops_per_step": flops_per_step,
          "flops_6nd_per_step": None if params is None else flops_6nd(params["non_embedding"], c),
          "scio": p.scio, "noise": p.noise, "evals": evals, "r_mean": None if r_mean is None else float(r_mean),
          "r_mean_chance": None if chance is None else float(chance), "wall_s": float(wall_s)}


def read_lines(workdir: str) -> dict[str, dict]:
  """The last sweep.jsonl line of each point."""
  path = io.path(workdir) / "sweep.jsonl"
  return {entry["point"]: entry for entry in io.read_jsonl(path)} if path.exists() else {}


def _record(workdir: str, entry: dict) -> None:
  path = io.path(workdir) / "sweep.jsonl"
  io.write_jsonl(path, (io.read_jsonl(path) if path.exists() else []) + [entry])


def _metrics(run_dir: str) -> list[dict]:
  path = io.path(run_dir) / "metrics.jsonl"
  return io.read_jsonl(path) if path.exists() else []


def _holds_another_run(run_dir: str, digest: str, data: dict) -> bool:
  """Whether a point's workdir holds a run of another config or on other data (its config.json and
  data_fingerprint.json, both written by training): resuming or collecting it would mix the two."""
  saved, inputs = io.path(run_dir) / "config.json", io.path(run_dir) / "data_fingerprint.json"
  return ((saved.exists() and config_hash(config_lib.read_saved(str(saved))) != digest)
          or (inputs.exists() and io.read_json(inputs) != data))


def _describe(data: dict | None) -> str:
  """A data fingerprint in a few characters: dataset and tokenizer sha256 prefixes."""
  if not data:
    return "unrecorded"
  return f"dataset {data['dataset']['sha256'][:8]}, tokenizer {data['tokenizer']['sha256'][:8]}"


def _finished(metrics: list[dict], steps: int) -> bool:
  """Whether a run's log holds its final held-out evaluation."""
  return any(e.get("step") == steps and "total" in e.get("eval", {}).get("heldout_loss", {}) for e in metrics)


def _train_seconds(metrics: list[dict], batch_size: int) -> float:
  """Training time a metrics log implies: the steps between logged lines over their throughput."""
  seconds, previous = 0.0, 0
  for entry in metrics:
    if entry.get("images_per_s"):
      seconds += (entry["step"] - previous) * batch_size / entry["images_per_s"]
      previous = entry["step"]
  return seconds


class _Sizes:
  """Parameter counts and train-step FLOPs per model shape, computed once (from shapes alone)."""

  def __init__(self, vocab_size: int):
    self.vocab_size, self._cache = vocab_size, {}

  def __call__(self, c: ml_collections.ConfigDict) -> tuple[dict, float]:
    key = json.dumps([c.model.to_dict(), c.train.batch_size, c.data.max_len, c.momentum.to_dict()],
                     sort_keys=True, default=str)
    if key not in self._cache:
      tx, _ = state_lib.make_optimizer(c.optim, c.train.steps)
      _, abstract, _ = state_lib.abstract_state(c, self.vocab_size, tx, mesh_lib.from_config(c.mesh))
      self._cache[key] = (size.parameter_counts(abstract.params), flops.train_step(c, self.vocab_size))
    return self._cache[key]


def _world(workdir: str, sweep: ml_collections.ConfigDict, p: Point) -> str:
  """The dataset of a point's noise rate (built on first use; the base's data_dir if it names one)."""
  if sweep.base.data.data_dir:
    return sweep.base.data.data_dir
  data_dir = str(io.path(workdir) / "worlds" / f"noise_{p.noise:g}")
  synth = sweep.base.data.synth.copy_and_resolve_references()
  synth.noise_rate = p.noise
  builder.build(data_dir, prepare.synth_settings(synth))
  return data_dir


def _tokenizer(workdir: str, sweep: ml_collections.ConfigDict, first_world: str) -> str:
  """The tokenizer every point uses: the base's (which must exist), or one trained on the first
  point's world, which a rerun reuses only for the vocabulary size it was trained for."""
  path = sweep.base.data.tokenizer or str(io.path(workdir) / "tokenizer.model")
  if sweep.base.data.tokenizer:
    return path
  if not io.exists(path):
    prepare.train_tokenizer(first_world, sweep.base.data.vocab_size, path)
  trained_for = tokenizer.TextCodec(path, sweep.base.data.max_len).trained_for
  if trained_for != sweep.base.data.vocab_size:
    raise ConfigError(f"{path}, the sweep's tokenizer, was trained for a vocabulary of {trained_for}, and "
                      f"base.data.vocab_size is {sweep.base.data.vocab_size}: set --config.base.data.vocab_size="
                      f"{trained_for}, or use a new --workdir for the new vocabulary (its points must not share a "
                      "tokenizer with the old ones).")
  return path


def _select(named: dict[str, Point], only: list[str] | None) -> dict[str, Point]:
  if not only:
    return named
  unknown = [n for n in only if n not in named]
  if unknown:
    raise ConfigError(f"--points {','.join(unknown)}: no such point; the sweep has {', '.join(named)}.")
  return {n: named[n] for n in only}


def _use_compilation_cache(workdir: str) -> None:
  """Persist compiled programs in WORKDIR/xla_cache (unless a cache is set already, e.g. by
  JAX_COMPILATION_CACHE_DIR): points of one model size share their compiles, across reruns too."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(io.path(workdir) / "xla_cache"))


HEADER = (f"{'point':<24} {'N':>10} {'D':>6} {'steps':>6} {'loss':>8} {'r_mean':>7} {'chance':>7} {'wall_s':>7}  "
          "status")


def _row(name: str, entry: dict, status: str) -> str:
  """A point's line of the progress table; r_mean beside its chance level (lines from before
  it was recorded show nan)."""
  loss = entry["evals"][-1]["loss"]["total"] if entry["evals"] else float("nan")
  n = entry["params"]["non_embedding"] if entry["params"] else 0
  r_mean, chance = (float("nan") if entry.get(k) is None else entry[k] for k in ("r_mean", "r_mean_chance"))
  return (f"{name:<24} {n:>10,} {entry['train_chips']:>6} {entry['steps']:>6} {loss:>8.4f} {r_mean:>7.3f} "
          f"{chance:>7.3f} {entry['wall_s']:>7.1f}  {status}")


def run(sweep: ml_collections.ConfigDict, workdir: str, *, only: list[str] | None = None,
        progress: bool = True, out=sys.stdout) -> dict[str, dict]:
  """Train and record every point not yet done; returns the last line of each selected point."""
  named = _select(points(sweep), only)
  prepare.check_tokenizer(sweep.base.data.tokenizer)  # before a world is built
  _use_compilation_cache(workdir)
  recorded = read_lines(workdir)
  tokenizer_path = _tokenizer(workdir, sweep, _world(workdir, sweep, next(iter(named.values()))))
  codec = tokenizer.TextCodec(tokenizer_path, sweep.base.data.max_len)
  sizes = _Sizes(codec.vocab_size)
  print(HEADER, file=out, flush=True)
  for name, p in named.items():
    start = time.perf_counter()
    run_dir = str(io.path(workdir) / "points" / name)
    c = point_config(sweep, p, data_dir=_world(workdir, sweep, p), tokenizer_path=tokenizer_path)
    digest, data = _hash(c), prepare.fingerprint(prepare.RunData(c.data.data_dir, codec, tokenizer_path))
    previous = recorded.get(name)
    if previous and previous["status"] == "done" and (previous["config_hash"], previous.get("data")) == (digest, data):
      print(_row(name, previous, "skipped (done)"), file=out, flush=True)
      continue
    if previous and previous["config_hash"] != digest:
      print(f"{name}: config changed since it was recorded ({previous['config_hash'][:12]} -> {digest[:12]}); "
            "rerunning", file=out, flush=True)
    elif previous and previous.get("data") != data:
      print(f"{name}: data changed since it was recorded ({_describe(previous.get('data'))} -> {_describe(data)}); "
            "rerunning", file=out, flush=True)
    if _holds_another_run(run_dir, digest, data):
      print(f"{name}: {run_dir} holds a run of another config or data; starting it afresh", file=out, flush=True)
      io.path(run_dir).rmtree()
    status, params, flops, error = "done", None, None, None
    try:
      config_lib.validate(c)
      params, flops = sizes(c)
      if _finished(_metrics(run_dir), p.steps):
        status = "collected (already trained)"
      else:
        train_job.train(c, run_dir, progress=progress)
      metrics = _metrics(run_dir)
      if not _finished(metrics, p.steps):
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no held-out loss at step {p.steps}")
    except Preempted:
      raise
    except Exception as e:  # any failure of one point is recorded; the sweep goes on
      error = f"{type(e).__name__}: {' '.join(str(e).split())}"
      status = f"failed: {error}"
      metrics = []
    wall = time.perf_counter() - start
    if status.startswith("collected"):
      wall = _train_seconds(metrics, c.train.batch_size)
    entry = line(name, p, c, data=data, params=params, flops_per_step=flops, metrics=metrics, wall_s=wall,
                 error=error)
    _record(workdir, entry)
    recorded[name] = entry
    print(_row(name, entry, status), file=out, flush=True)
  done = sum(recorded[n]["status"] == "done" for n in named if n in recorded)
  print(f"{done} of {len(named)} points done; {io.path(workdir) / 'sweep.jsonl'}", file=out, flush=True)
  return {n: recorded[n] for n in named if n in recorded}


def _value(v) -> str:
  if isinstance(v, (list, tuple)):
    return "(" + ",".join(_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return str(v)


def overrides(base: ml_collections.ConfigDict, c: ml_collections.ConfigDict) -> list[str]:
  """`--config.a.b=value` for every field where `c` differs from `base` (the data and tokenizer
  locations left out: the launched run makes its own)."""
  before, after = (config_lib.flat(json.loads(x.to_json_best_effort())) for x in (base, c))
  return [f"--config.{key}={_value(value)}" for key, value in after.items()
          if before.get(key) != value and key not in ("data.data_dir", "data.tokenizer")]


def launch_commands(sweep: ml_collections.ConfigDict, workdir: str, *, tpu_name: str, zone: str,
                    launch_args: str = "", only: list[str] | None = None) -> list[str]:
  """One `launch/tpu_vm.sh run` per point (one slice each): `klip pretrain` of the point's config
  into WORKDIR/points/<name>/, where a later `klip sweep run` finds and records it."""
  named = _select(points(sweep), only)
  tokenizer_path = sweep.base.data.tokenizer
  if not tokenizer_path and len({p.noise for p in points(sweep).values()}) > 1:
    # A slice trains its tokenizer on its own world; the sweep's one is trained on the first
    # point's, so the other noise rates' slices would train on another tokenizer than the sweep
    # records (and `klip sweep run` would retrain them on its own).
    raise ConfigError("--emit-launch over several noise rates: every slice must read the sweep's one tokenizer; "
                      "train one (klip data tokenizer) where the slices can read it and name it with "
                      "--config.base.data.tokenizer=gs://.../tokenizer.model.")
  base = config_lib.load(os.path.join(config_lib.CONFIG_DIR, sweep.base_config))
  commands = []
  for name, p in named.items():
    slice_name = f"{tpu_name}-{name}".replace("_", "-").replace(".", "-").lower()
    args = ["launch/tpu_vm.sh", "run", "--name", slice_name, "--zone", zone, *shlex.split(launch_args),
            "--config", f"configs/{sweep.base_config}", "--workdir", f"{workdir.rstrip('/')}/points/{name}", "--",
            *overrides(base, point_config(sweep, p)),
            *([f"--config.data.tokenizer={tokenizer_path}"] if tokenizer_path else [])]
    commands.append(shlex.join(args))
  return commands
