"""PNG plots of a sweep fit: loss vs compute per model size with the frontier, the IsoFLOP
parabolas, and the residuals of L(N, D). Each is written atomically; a plot whose fit is not
identifiable is left out (its reason is in fit.md)."""

from __future__ import annotations

import textwrap

import matplotlib
import numpy as np

from klip_jax import io
from klip_jax.sweep import fit

matplotlib.use("Agg")
from matplotlib import pyplot as plt


def _save(fig, path: io.PathLike) -> None:
  fig.tight_layout()
  with io.atomic_path(path) as tmp, tmp.open("wb") as f:  # a file object: tmp may be on gs://
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)


def _colours(sizes: list[float]) -> dict[float, tuple]:
  return {n: plt.cm.viridis(i / max(len(sizes) - 1, 1)) for i, n in enumerate(sorted(sizes))}


def _value(result: dict, law: str, name: str) -> float:
  return result[law]["params"][name]["value"]


def write(folder: io.PathLike, runs: list[fit.Run], result: dict, prefix: str = "") -> list[str]:
  """The plots of one arm's fit into `folder`; returns the paths written."""
  folder = io.path(folder)
  written = []
  for name, draw in (("loss_vs_compute", _loss_vs_compute), ("isoflop", _isoflop), ("residuals", _residuals)):
    fig = draw(runs, result)
    if fig is not None:
      path = folder / f"{prefix}{name}.png"
      _save(fig, path)
      written.append(str(path))
  return written


def _loss_vs_compute(runs: list[fit.Run], result: dict):
  """Every run's eval losses against cumulative FLOPs, coloured by size; the lower envelope of
  all points (the measured frontier) and the fitted law's compute-optimal loss L(N_opt(C), D_opt(C))."""
  fig, ax = plt.subplots(figsize=(7.5, 5))
  colours = _colours([r.n for r in runs])
  labelled = set()
  for r in sorted(runs, key=lambda r: r.n):
    ax.plot(r.c, r.loss, "o-", ms=3, lw=1, color=colours[r.n], alpha=0.8,
            label=None if r.n in labelled else f"N = {r.n:.3g}")
    labelled.add(r.n)
  c = np.concatenate([r.c for r in runs])
  loss = np.concatenate([r.loss for r in runs])
  order = np.argsort(c)
  ax.step(c[order], np.minimum.accumulate(loss[order]), where="post", color="black", lw=1.5,
          label="lower envelope (measured frontier)")
  if result["compute_optimal"]["identifiable"]:
    law = {k: _value(result, "L(N,D)", k) for k in ("E", "A", "alpha", "B", "beta")}
    co = {k: _value(result, "compute_optimal", k) for k in ("k", "G", "a")}
    lo, hi = result["range"]["C"]
    for grid, style, label in ((np.geomspace(lo, hi, 100), "-", "fitted compute-optimal L(N_opt, D_opt)"),
                               (np.geomspace(hi, 10 * hi, 30), "--", "(extrapolated)")):
      n_opt = co["G"] * (grid / co["k"]) ** co["a"]
      d_opt = grid / co["k"] / n_opt
      ax.plot(grid, law["E"] + law["A"] / n_opt ** law["alpha"] + law["B"] / d_opt ** law["beta"], style,
              color="crimson", lw=2, label=label)
  ax.set(xscale="log", yscale="log", xlabel="cumulative training FLOPs C (XLA cost analysis)",
         ylabel=f"held-out {result['loss']} loss", title="loss vs compute per model size")
  ax.legend(fontsize=7)
  return fig


def _isoflop(runs: list[fit.Run], result: dict):
  """Approach 2: per compute budget the best loss per size with its parabola in log N, and the
  parabolas' minima N_opt against C with their power-law fit."""
  bins = fit.isoflop_bins(runs, fit.plan(runs, result["data"]).iso_budgets)
  if not bins:
    return None
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
  for i, b in enumerate(bins):
    colour = plt.cm.plasma(i / max(len(bins) - 1, 1))
    n = np.array(b["N"])
    grid = np.geomspace(n[0], n[-1], 50)
    left.plot(n, b["loss"], "o", color=colour, ms=4, label=f"C = {b['C']:.2g}")
    left.plot(grid, np.polyval(b["parabola"], np.log(grid)), "-", color=colour, lw=1)
    if b["N_opt"]:
      left.plot(b["N_opt"], np.polyval(b["parabola"], np.log(b["N_opt"])), "kx", ms=8)
  left.set(xscale="log", xlabel="non-embedding params N", ylabel=f"held-out {result['loss']} loss",
           title="IsoFLOP profiles (x: minimum bracketed by the sizes)")
  left.legend(fontsize=6, ncol=2)
  inside = [b for b in bins if b["N_opt"]]
  right.plot([b["C"] for b in inside], [b["N_opt"] for b in inside], "kx", ms=8, label="parabola minima")
  if result["isoflop"]["identifiable"]:
    iso = result["isoflop"]["params"]
    c = np.geomspace(bins[0]["C"], bins[-1]["C"], 50)
    ci = iso["a"]["ci"]
    right.plot(c, iso["N_opt(C) coefficient"]["value"] * c ** iso["a"]["value"], "-", color="crimson",
               label=f"N_opt ~ C^{iso['a']['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
  else:
    right.text(0.02, 0.85, textwrap.fill("not identifiable: " + result["isoflop"]["reason"], 60),
               transform=right.transAxes, fontsize=7, va="top")
  right.set(xlabel="compute C", ylabel="N_opt", title="N_opt(C) from the minima")
  if inside:  # no minimum inside the sizes: nothing to put on log axes
    right.set(xscale="log", yscale="log")
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a short range
  right.legend(fontsize=7, loc="upper left")
  return fig


def _residuals(runs: list[fit.Run], result: dict):
  """log L - log L_pred of L(N, D) against N and against D: structure left in them is what the
  law does not capture (a trend in D along runs, e.g. from the learning-rate schedule)."""
  if not result["L(N,D)"]["identifiable"]:
    return None
  law = {k: _value(result, "L(N,D)", k) for k in ("E", "A", "alpha", "B", "beta")}
  pts = fit.points(runs, result["data"])
  n, d, loss = pts[:, 0], pts[:, 1], pts[:, 3]
  residual = np.log(loss) - np.log(law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"])
  colours = _colours(sorted(set(n)))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, x, label in ((axes[0], n, "non-embedding params N"), (axes[1], d, f"D ({result['data']})")):
    ax.scatter(x, residual, s=12, c=[colours[v] for v in n])
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xscale="log", xlabel=label)
  axes[0].set_ylabel("log L - log L(N, D) fitted")
  axes[0].set_title(f"residuals of L(N, D) (colour: N), rms {np.sqrt(np.mean(residual ** 2)):.3g}", fontsize=9)
  return fig
