"""Scaling laws from a sweep table (WORKDIR/sweep.jsonl, one JSON line per sweep point and try).

N = non-embedding parameters, D = images seen at an eval (`data="images_seen"`) or the run's
unique train images (`"unique_images"`: final evals only, for data-constrained questions),
C = cumulative XLA FLOPs, L = the held-out loss of one head.
  * L(N, D) = E + A/N^alpha + B/D^beta on every eval point of every run (Hoffmann et al. 2022,
    approach 3): Huber loss (delta 1e-3) on log L_pred - log L with log L_pred =
    LSE(a - alpha log N, b - beta log D, e), L-BFGS-B from the best few points of a grid of
    initialisations (Chinchilla's), the lowest optimum kept.
  * L(N) = E' + A/N^alpha at one D (each run's curve interpolated log-log at the D reached by
    the most model sizes, so E' holds B/D^beta) and L(D) = E'' + B/D^beta along the runs of one
    model size (the one with the most points): the same estimator.
  * C ~ k N D with k the geometric mean of C/(N D); N_opt(C) = G (C/k)^a, D_opt(C) = G^-1 (C/k)^b,
    G = (alpha A / (beta B))^(1/(alpha+beta)), a = beta/(alpha+beta), b = alpha/(alpha+beta)
    (Chinchilla eq. 4).
  * IsoFLOP (approach 2): every run's loss interpolated log-log at log-spaced compute budgets,
    the best run per size, a parabola in log N per budget with >= 3 sizes whose minimum the
    sizes bracket: N_opt(C); log N_opt fitted linearly in log C.
With `floor="zero"`, L(N, D) drops E (E = 0: A/N^alpha + B/D^beta, the reducible loss alone, as
in Kaplan et al.'s form): for tables whose losses sit so far above any irreducible loss that E
is not identifiable (the free fit drives it to its bound), the exponents of the reducible part
still are; the report says E was fixed, never silently. The slices L(N) and L(D) keep their
E' and E'', which hold the other term (B/D^beta at the slice's D, A/N^alpha at its N) and so
are never zero.
Uncertainty: a bootstrap over runs, resampled with replacement within each model size (the
sweep's design fixes the sizes; resampling runs keeps each run's correlated evals together),
percentile 95% CIs for every parameter and derived number. A law the table cannot determine
(< 3 levels of N or D, no more points than parameters, a CI reaching a parameter's bound, a
bootstrap that mostly fails or cannot vary it) comes back flagged with the reason, not numbers.
Pure numpy/scipy: no jax.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import numpy as np
from scipy import optimize, special
from threadpoolctl import threadpool_limits

from klip_jax.errors import FitError

HEADS = ("total", "itc", "itm", "reconstruction")
DATA = ("images_seen", "unique_images")
FLOORS = ("fit", "zero")  # E fitted, or fixed at 0
DELTA = 1e-3  # Huber threshold on log-residuals (Chinchilla)
EXPONENT_BOUNDS = (0.0, 3.0)
LOG_BOUNDS = (-20.0, 80.0)  # e = log E, a = log A, b = log B
ZERO_E = LOG_BOUNDS[0]  # e of a law fitted without E
MIN_LEVELS = 3  # E + A/x^alpha has three parameters: three distinct x at least
STARTS = 4  # L-BFGS-B runs from the best grid points
ISOFLOP_BUDGETS = 12
BOOTSTRAP_MIN_OK = 0.5  # a law fitted in fewer of the resamples is flagged (its CI would be conditional)


class NotIdentifiable(Exception):
  """The points cannot determine a law; the message says which term and why."""


@dataclasses.dataclass
class Run:
  """One finished sweep point: its size and its usable evals (finite loss, D > 0, C > 0)."""
  name: str
  n: float
  chips: int
  d: np.ndarray  # images seen, ascending
  c: np.ndarray  # cumulative FLOPs
  loss: np.ndarray
  final: bool  # whether the last eval of the run is among them

  def curve(self, data: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(D, C, L) of the points this run gives the fits."""
    if data == "images_seen":
      return self.d, self.c, self.loss
    if not self.final:
      return np.zeros(0), np.zeros(0), np.zeros(0)
    return np.array([float(self.chips)]), self.c[-1:], self.loss[-1:]


@dataclasses.dataclass
class Sweep:
  arms: dict[str, list[Run]]  # knob setting (scio, noise) -> its runs, fitted separately
  failed: list[dict]  # {"point", "error"} of points whose last line failed
  notes: list[str]
  loss: str  # the head fitted


def read(text: str, loss: str = "total", source: str = "sweep.jsonl") -> Sweep:
  """Parse sweep.jsonl; the last line of a point wins (a failed try, then a success). The done
  points of one arm must share their data (the dataset and tokenizer fingerprint of the line):
  a point left from an earlier sweep on other data would bend the law without a word."""
  if loss not in HEADS:
    raise FitError(f"--loss {loss}: choose one of {', '.join(HEADS)}.")
  lines = text.splitlines()
  latest: dict[str, tuple[int, dict]] = {}
  notes = []
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) and not text.endswith("\n"):  # a write cut short by a kill
        notes.append(f"{source} line {i}: cut short (the runner was stopped while writing it); ignored")
        continue
      raise FitError(f"{source} line {i}: not JSON ({e}); fix or delete the line.") from None
    if not isinstance(row, dict) or not isinstance(row.get("point"), str) or row.get("status") not in (
        "done", "failed"):
      raise FitError(f"{source} line {i}: needs a string 'point' and 'status' done or failed; fix or delete it.")
    latest[row["point"]] = (i, row)
  arms: dict[str, list[Run]] = {}
  failed = []
  dropped_nonfinite = []
  trained_on: dict[str, dict[str, list[str]]] = {}  # arm -> the data fingerprint (sweep.jsonl's "data") -> points
  for name, (i, row) in sorted(latest.items(), key=lambda item: item[1][0]):  # in the order of the lines that won
    if row["status"] == "failed":
      failed.append({"point": name, "error": row.get("error") or "(no error recorded)"})
      continue
    run = _run(row, i, loss, source)
    dropped_nonfinite += [f"{name} step {s}" for s in run.pop("nonfinite")]
    if not len(run["d"]):
      notes.append(f"{name}: no eval with a finite {loss} loss after training began; left out")
      continue
    arm = f"scio={'on' if row.get('scio') else 'off'}, noise={row.get('noise') or 0.0:g}"
    arms.setdefault(arm, []).append(Run(name=name, **run))
    if row.get("data"):  # lines from before the data was recorded are not compared
      trained_on.setdefault(arm, {}).setdefault(json.dumps(row["data"], sort_keys=True), []).append(name)
  for arm, by_data in trained_on.items():
    if len(by_data) > 1:
      groups = "; ".join(", ".join(names) for names in by_data.values())
      raise FitError(f"{source}: the points of {arm} were trained on {len(by_data)} different datasets or "
                     f"tokenizers ({groups}), so their losses do not lie on one law: rerun `klip sweep run` "
                     "with the sweep's data (it retrains the points trained on other data), or delete the "
                     "lines of points no longer in the sweep.")
  if dropped_nonfinite:
    notes.append(f"non-finite {loss} loss, left out: {', '.join(dropped_nonfinite)}")
  if not arms:
    raise FitError(f"{source}: no finished point with a usable eval ({len(failed)} failed); run or rerun "
                   "`klip sweep run` first.")
  return Sweep(arms=arms, failed=failed, notes=notes, loss=loss)


def _run(row: dict, line: int, loss: str, source: str) -> dict:
  where = f"{source} line {line} (point {row['point']})"
  try:
    n = float(row["params"]["non_embedding"])
    chips = int(row["train_chips"])
    evals = sorted(row["evals"], key=lambda e: e["step"])
    table = [(e["step"], float(e["images_seen"]), float(e["flops"]),
              math.nan if e["loss"][loss] is None else float(e["loss"][loss])) for e in evals]
  except (KeyError, TypeError, ValueError) as e:
    raise FitError(f"{where}: a done point needs params.non_embedding, train_chips and evals with step, "
                   f"images_seen, flops and loss.{loss} ({type(e).__name__}: {e}); rerun the point.") from None
  if n <= 0 or not table:
    raise FitError(f"{where}: non_embedding params {n:g} and {len(table)} evals; rerun the point.")
  keep = [(s, d, c, l) for s, d, c, l in table if d > 0 and c > 0 and math.isfinite(l) and l > 0]
  return {"n": n, "chips": chips, "d": np.array([k[1] for k in keep]), "c": np.array([k[2] for k in keep]),
          "loss": np.array([k[3] for k in keep]), "final": bool(keep) and keep[-1][0] == table[-1][0],
          "nonfinite": [s for s, _, _, l in table if not (math.isfinite(l) and l > 0)]}


# -- the estimator ------------------------------------------------------------------------------

def _log_pred(theta: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """log L_pred and each term's share of L_pred; theta (..., 1 + 2m) = (e, a_1, alpha_1, ...),
  x (n, m) the logs of N / D."""
  e, a, alpha = theta[..., :1], theta[..., 1::2], theta[..., 2::2]
  power = a[..., None, :] - alpha[..., None, :] * x  # (..., n, m)
  top = np.maximum(e, power.max(-1))  # numpy's LSE: scipy.special.logsumexp costs 100x more per call here
  parts = np.concatenate([np.exp(e - top)[..., None], np.exp(power - top[..., None])], -1)
  total = parts.sum(-1)
  return top + np.log(total), parts / total[..., None]


def _objective(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
  """Sum of Huber(log-residual) / delta (same minimiser; scaled so L-BFGS-B's relative tolerance
  does not stop it early, the failure Besiroglu et al. 2024 found in the original fit), and its gradient."""
  pred, share = _log_pred(theta, x)
  r = pred - y
  w = share * (np.clip(r, -DELTA, DELTA) / DELTA)[:, None]  # d huber / d term
  grad = np.empty_like(theta)
  grad[0] = w[:, 0].sum()
  grad[1::2] = w[:, 1:].sum(0)
  grad[2::2] = -(w[:, 1:] * x).sum(0)
  return float(special.huber(DELTA, r).sum() / DELTA), grad


def _grid(m: int, y: np.ndarray, zero_floor: bool) -> np.ndarray:
  """Chinchilla's initialisations (a, b in 0..25, exponents 0..2), E below the lowest loss."""
  axes = [np.array([ZERO_E]) if zero_floor else np.log(np.exp(y.min()) * np.array([0.1, 0.3, 0.5, 0.7, 0.9]))]
  axes += [np.arange(0.0, 26.0, 5.0), np.array([0.05, 0.5, 1.0, 1.5, 2.0])] * m
  return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 1 + 2 * m)


def fit_law(x: np.ndarray, loss: np.ndarray, warm: list[np.ndarray] = (), zero_floor: bool = False) -> np.ndarray:
  """theta = (e, a_1, alpha_1, ..., a_m, alpha_m) minimising the Huber objective for
  L = exp(e) + sum_j exp(a_j) / exp(x_j)^alpha_j; x (n, m) holds log N / log D. L-BFGS-B starts
  from the best few grid points, or only from `warm` when given (a bootstrap resample starts
  from the full table's optimum, which is close: on sampled resamples grid starts found the same).
  `zero_floor` pins e at ZERO_E (E = 2e-9, zero beside any loss)."""
  y = np.log(loss)
  starts = list(warm)
  if not starts:
    grid = _grid(x.shape[1], y, zero_floor)
    scores = special.huber(DELTA, _log_pred(grid, x)[0] - y).sum(-1)
    starts = grid[np.argsort(scores)[:STARTS]]
  bounds = [(ZERO_E, ZERO_E) if zero_floor else LOG_BOUNDS] + [LOG_BOUNDS, EXPONENT_BOUNDS] * x.shape[1]
  best = None
  for start in starts:
    res = optimize.minimize(_objective, start, args=(x, y), jac=True, method="L-BFGS-B", bounds=bounds,
                            options={"maxiter": 5000, "ftol": 1e-13, "gtol": 1e-9})
    if best is None or res.fun < best.fun:
      best = res
  return best.x


def _levels(problems: list[str], values: np.ndarray, term: str, what: str) -> None:
  count = np.unique(values).size
  if count < MIN_LEVELS:
    problems.append(f"{term}: {count} {what} ({', '.join(f'{v:.3g}' for v in np.unique(values))}); "
                    f"its power law needs >= {MIN_LEVELS}")


def _require(problems: list[str], points: int, params: int) -> None:
  if points <= params:
    problems.append(f"{points} points for {params} parameters (need more points than parameters)")
  if problems:
    raise NotIdentifiable("; ".join(problems))


def _joint(runs: list[Run], data: str, warm, zero_floor: bool) -> np.ndarray:
  """theta of L(N, D) on every point."""
  pts = points(runs, data)
  problems = []
  _levels(problems, pts[:, 0], "alpha", "model sizes")
  _levels(problems, pts[:, 1], "beta", f"data sizes ({data})")
  _require(problems, len(pts), 4 if zero_floor else 5)
  return fit_law(np.log(pts[:, :2]), pts[:, 3], warm, zero_floor)


def points(runs: list[Run], data: str) -> np.ndarray:
  """(N, D, C, L) rows of every point the runs give the fits."""
  cols = [(np.full(len(d), r.n), d, c, l) for r in runs for d, c, l in [r.curve(data)]]
  return np.concatenate([np.stack(c, 1) for c in cols]) if cols else np.zeros((0, 4))


def _at(x: np.ndarray, y: np.ndarray, x0: float) -> float | None:
  """y at x0 interpolated log-log along one run (None outside the run's evals)."""
  if not len(x) or not x[0] * (1 - 1e-9) <= x0 <= x[-1] * (1 + 1e-9):
    return None
  return float(np.exp(np.interp(np.log(x0), np.log(x), np.log(y))))


def slice_n(runs: list[Run], data: str, d_star: float) -> np.ndarray:
  """(N, L) of every run whose curve reaches D = d_star, interpolated there."""
  rows = [(r.n, _at(d, l, d_star)) for r in runs for d, _, l in [r.curve(data)]]
  return np.array([row for row in rows if row[1] is not None]).reshape(-1, 2)


def slice_d(runs: list[Run], data: str, n_star: float) -> np.ndarray:
  """(D, L) of every point of the runs of size n_star."""
  pts = points([r for r in runs if r.n == n_star], data)
  return pts[:, [1, 3]]


def isoflop_bins(runs: list[Run], budgets: np.ndarray) -> list[dict]:
  """Per compute budget: the best loss per model size at that budget (interpolated along each
  run), a parabola in log N when >= 3 sizes, and its minimum when the sizes bracket it."""
  bins = []
  for budget in budgets:
    best: dict[float, float] = {}
    for r in runs:
      value = _at(r.c, r.loss, budget)
      if value is not None:
        best[r.n] = min(value, best.get(r.n, np.inf))
    if len(best) < MIN_LEVELS:
      continue
    n, l = np.array(sorted(best)), np.array([best[k] for k in sorted(best)])
    coef = np.polyfit(np.log(n), l, 2)
    vertex = -coef[1] / (2 * coef[0]) if coef[0] > 0 else np.nan
    # A minimum counts only when measured sizes bracket it: the best size is not an end one (a
    # parabola through an edge optimum lands anywhere past it).
    inside = bool(0 < np.argmin(l) < len(l) - 1 and np.log(n[0]) < vertex < np.log(n[-1]))
    bins.append({"C": float(budget), "N": n.tolist(), "loss": l.tolist(), "parabola": coef.tolist(),
                 "N_opt": float(np.exp(vertex)) if inside else None})
  return bins


@dataclasses.dataclass
class Plan:
  """What the full table fixes for every bootstrap resample (so each estimates the same thing)."""
  data: str
  floor: str  # "fit" or "zero" (E fixed at 0)
  d_star: float | None  # the D of L(N)
  n_star: float | None  # the N of L(D)
  budgets: np.ndarray  # compute budgets for the compute-optimal predictions
  iso_budgets: np.ndarray


def plan(runs: list[Run], data: str, floor: str = "fit") -> Plan:
  pts = points(runs, data)
  curves = [r.curve(data) for r in runs]
  ends = sorted({float(d[-1]) for d, _, _ in curves if len(d)})
  # L(N): the D reached by the most sizes, then by the most runs, then the largest.
  d_star = max(ends, key=lambda d0: (np.unique(slice_n(runs, data, d0)[:, 0]).size, len(slice_n(runs, data, d0)),
                                     d0)) if ends else None
  sizes = np.unique(pts[:, 0]) if len(pts) else np.zeros(0)
  n_star = max(sizes, key=lambda n: (len(slice_d(runs, data, n)), n)) if len(sizes) else None
  c_lo, c_hi = (pts[:, 2].min(), pts[:, 2].max()) if len(pts) else (1.0, 1.0)
  budgets = np.array([c_lo, math.sqrt(c_lo * c_hi), c_hi, 10 * c_hi, 100 * c_hi])
  starts = [r.c[0] for r in runs if len(r.c)]
  iso = np.geomspace(min(starts), max(r.c[-1] for r in runs if len(r.c)), ISOFLOP_BUDGETS) if starts else np.zeros(0)
  return Plan(data=data, floor=floor, d_star=d_star, n_star=n_star, budgets=budgets, iso_budgets=iso)


def estimate(runs: list[Run], p: Plan, warm: dict | None = None) -> dict[str, dict | str]:
  """Every law's parameters (name -> value) on these runs, or the reason it is not identifiable."""
  warm = warm or {}
  zero = p.floor == "zero"
  out: dict[str, dict | str] = {}
  try:
    e, a, alpha, b, beta = _joint(runs, p.data, warm.get("L(N,D)", ()), zero)
    out["L(N,D)"] = {"E": 0.0 if zero else math.exp(e), "A": math.exp(a), "alpha": alpha, "B": math.exp(b),
                     "beta": beta}
  except NotIdentifiable as err:
    out["L(N,D)"] = str(err)
  for law, key, name, pts1 in (
      ("L(N)", "A", "alpha", slice_n(runs, p.data, p.d_star) if p.d_star else np.zeros((0, 2))),
      ("L(D)", "B", "beta", slice_d(runs, p.data, p.n_star) if p.n_star else np.zeros((0, 2)))):
    try:
      problems = []
      _levels(problems, pts1[:, 0], name, "model sizes" if law == "L(N)" else f"data sizes ({p.data})")
      _require(problems, len(pts1), 3)
      e, a, exponent = fit_law(np.log(pts1[:, :1]), pts1[:, 1], warm.get(law, ()))
      out[law] = {"E": math.exp(e), key: math.exp(a), name: exponent}
    except NotIdentifiable as err:
      out[law] = str(err)
  out["compute_optimal"] = _compute_optimal(out["L(N,D)"], runs, p)
  out["isoflop"] = _isoflop(runs, p)
  return out


def _compute_optimal(law: dict | str, runs: list[Run], p: Plan) -> dict | str:
  if p.data != "images_seen" and not all(r.final and r.d[-1] == r.chips for r in runs):
    return ("needs D = images seen (C ~ k N D); with --data unique_images only when every run saw each of its "
            "chips once (a one-pass sweep)")
  if isinstance(law, str):
    return f"needs an identifiable L(N,D) ({law})"
  pts = points(runs, p.data)
  k = float(np.exp(np.mean(np.log(pts[:, 2]) - np.log(pts[:, 0]) - np.log(pts[:, 1]))))
  alpha, beta = law["alpha"], law["beta"]
  if alpha <= 0 or beta <= 0:
    return f"needs alpha > 0 and beta > 0 (L(N,D) has alpha {alpha:.3g}, beta {beta:.3g})"
  g = (alpha * law["A"] / (beta * law["B"])) ** (1 / (alpha + beta))
  out = {"k": k, "G": g, "a": beta / (alpha + beta), "b": alpha / (alpha + beta)}
  for i, budget in enumerate(p.budgets):
    n_opt = g * (budget / k) ** out["a"]
    d_opt = (budget / k) / n_opt
    out[f"N_opt[{i}]"] = n_opt
    out[f"D_opt[{i}]"] = d_opt
    out[f"loss[{i}]"] = law["E"] + law["A"] / n_opt ** alpha + law["B"] / d_opt ** beta
  return out


def _isoflop(runs: list[Run], p: Plan) -> dict | str:
  bins = isoflop_bins(runs, p.iso_budgets)
  inside = [b for b in bins if b["N_opt"] is not None]
  if len(inside) < MIN_LEVELS:
    return (f"{len(bins)} compute budgets have >= {MIN_LEVELS} model sizes, {len(inside)} of them a minimum "
            f"bracketed by the sizes; approach 2 needs {MIN_LEVELS}")
  slope, intercept = np.polyfit(np.log([b["C"] for b in inside]), np.log([b["N_opt"] for b in inside]), 1)
  return {"a": float(slope), "N_opt(C) coefficient": float(math.exp(intercept))}


# -- bootstrap and the result -------------------------------------------------------------------

def fit(runs: list[Run], data: str = "images_seen", bootstrap: int = 200, seed: int = 0,
        progress: Callable | None = None, floor: str = "fit") -> dict:
  """The fits of one arm with percentile 95% CIs from `bootstrap` resamples of its runs."""
  if data not in DATA:
    raise FitError(f"--data {data}: choose one of {', '.join(DATA)}.")
  if floor not in FLOORS:
    raise FitError(f"--floor {floor}: choose one of {', '.join(FLOORS)}.")
  if not len(points(runs, data)):
    raise FitError(f"no run has a usable final eval to fit with --data {data}; use --data images_seen.")
  p = plan(runs, data, floor)
  groups = [[r for r in runs if r.n == n] for n in sorted({r.n for r in runs})]
  rng = np.random.default_rng(seed)
  reps = []
  # One BLAS thread: L-BFGS-B's tiny BLAS calls ran 10x slower with OpenBLAS threads spinning on 2 busy cores.
  with threadpool_limits(1, user_api="blas"):
    point = estimate(runs, p)
    warm = {law: [_theta(law, v)] for law, v in point.items() if law in ("L(N,D)", "L(N)", "L(D)")
            and isinstance(v, dict)}
    bootstrap = bootstrap if warm else 0  # no law to resample: the caller refuses the table
    for _ in progress(range(bootstrap)) if progress and bootstrap else range(bootstrap):
      sample = [g[i] for g in groups for i in rng.integers(len(g), size=len(g))]
      reps.append(estimate(sample, p, warm))
  pts = points(runs, data)
  result = {"runs": len(runs), "points": len(pts), "data": data,
            "range": {k: [float(pts[:, j].min()), float(pts[:, j].max())] for j, k in enumerate("NDC")},
            "L(N) at D": p.d_star, "L(D) at N": p.n_star, "bootstrap": bootstrap, "seed": seed, "floor": floor}
  for law, value in point.items():
    fixed = ("E",) if floor == "zero" and law == "L(N,D)" else ()
    result[law] = _summary(law, value, [r[law] for r in reps], bootstrap, fixed)
  if result["compute_optimal"]["identifiable"] and not result["L(N,D)"]["identifiable"]:  # flagged by its CI
    result["compute_optimal"] = {"identifiable": False,
                                 "reason": f"needs an identifiable L(N,D) ({result['L(N,D)']['reason']})"}
  co = result["compute_optimal"]
  if "params" in co:
    co["predictions"] = []
    for i, budget in enumerate(p.budgets):
      row = {"C": float(budget)}
      for name in ("N_opt", "D_opt", "loss"):
        row[name] = co["params"].pop(f"{name}[{i}]")
      span = result["range"]
      row["extrapolated"] = [k for k, v in (("C", budget), ("N", row["N_opt"]["value"]), ("D", row["D_opt"]["value"]))
                             if not span[k][0] * (1 - 1e-9) <= v <= span[k][1] * (1 + 1e-9)]  # the ranges outside
      co["predictions"].append(row)
  return result


def _theta(law: str, v: dict) -> np.ndarray:
  """A law's parameters back in fit_law's form (e, a, alpha, ...), to warm-start the resamples."""
  terms = {"L(N,D)": ("A", "alpha", "B", "beta"), "L(N)": ("A", "alpha"), "L(D)": ("B", "beta")}[law]
  return np.array([math.log(v["E"]) if v["E"] > 0 else ZERO_E] + [math.log(v[k]) if k in "AB" else v[k] for k in terms])


def _summary(law: str, value: dict | str, reps: list, bootstrap: int, fixed: tuple[str, ...] = ()) -> dict:
  """The point estimate with CIs, or the reason the table cannot give it; `fixed` parameters
  were not fitted (no CI, never flagged)."""
  if isinstance(value, str):
    return {"identifiable": False, "reason": value}
  ok = [r for r in reps if isinstance(r, dict)]
  params = {}
  problems = []
  for name, v in value.items():
    ci = None
    if ok and name not in fixed:
      lo, hi = np.percentile([r[name] for r in ok], [2.5, 97.5])
      ci = [float(lo), float(hi)]
    params[name] = {"value": float(v), "ci": ci}
    problems += [] if name in fixed else _at_bound(name, float(v), ci)
  if bootstrap and len(ok) < BOOTSTRAP_MIN_OK * bootstrap:
    reasons = sorted({r for r in reps if isinstance(r, str)})
    problems.append(f"fitted in only {len(ok)} of {bootstrap} bootstrap resamples of the runs "
                    f"({reasons[0] if reasons else ''})")
  exponents = [params[k]["ci"] for k in ("alpha", "beta", "a") if k in params and params[k]["ci"]]
  if ok and exponents and all(hi - lo < 1e-6 for lo, hi in exponents):
    problems.append("the bootstrap over runs cannot vary it (one run per model size): no uncertainty measurable")
  out = {"identifiable": not problems, "params": params, "bootstrap_ok": len(ok)}
  if problems:
    out["reason"] = "; ".join(problems)
  return out


def _at_bound(name: str, value: float, ci: list | None) -> list[str]:
  """A parameter (or its CI) at the optimiser's bound: that term is not pinned by the data."""
  if name not in ("alpha", "beta", "E", "A", "B"):
    return []
  log = name in ("E", "A", "B")
  for what, v in [("estimate", value)] + [("95% CI", c) for c in ci or []]:
    t = math.log(max(v, 1e-300)) if log else v
    for bound in LOG_BOUNDS if log else EXPONENT_BOUNDS:
      if abs(t - bound) < (1e-2 if log else 1e-3):
        return [f"{name}: {what} reaches the fit's bound {math.exp(bound) if log else bound:.3g} (the data do "
                "not pin this term)"]
  return []


def fit_sweep(sweep: Sweep, data: str = "images_seen", bootstrap: int = 200, seed: int = 0,
              progress: Callable | None = None, floor: str = "fit") -> dict:
  """Every arm fitted; a law the table cannot determine is marked so, with the reason (`refusal`)."""
  arms = {arm: {"loss": sweep.loss, **fit(runs, data, bootstrap, seed, progress, floor)}
          for arm, runs in sweep.arms.items()}
  return {"failed": sweep.failed, "notes": sweep.notes, "arms": arms}


def refusal(result: dict) -> str | None:
  """Why `fit_sweep`'s result holds no law at all (None when some law of some arm is identifiable)."""
  laws = ("L(N,D)", "L(N)", "L(D)")
  if any(arm[law]["identifiable"] for arm in result["arms"].values() for law in laws):
    return None
  reasons = "; ".join(f"{name} {law}: {arm[law]['reason']}" for name, arm in result["arms"].items() for law in laws)
  hint = ""
  if any(arm["floor"] == "fit" and arm["L(N,D)"]["reason"].startswith("E: estimate reaches the fit's bound")
         for arm in result["arms"].values()):
    hint = (" E sits at its lower bound: the losses are far above any irreducible loss, so E cannot be told from 0;"
            " `--floor zero` fits L(N, D)'s reducible part alone (E = 0).")
  return (f"no scaling law is identifiable from this sweep: {reasons}. Each exponent needs >= 3 model sizes (or data "
          "sizes) over which the loss falls as a power law: add sizes, or train the sizes long enough to tell apart."
          + hint)
