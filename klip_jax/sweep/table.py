"""`klip sweep fit`: read WORKDIR/sweep.jsonl, fit every arm (klip_jax.sweep.fit), and write
WORKDIR/fit.json, the markdown report WORKDIR/fit.md and WORKDIR/plots/*.png."""

from __future__ import annotations

import re

from tqdm import tqdm

from klip_jax import io
from klip_jax.errors import FitError
from klip_jax.sweep import fit, plots

LAWS = (("L(N,D)", ("E", "A", "alpha", "B", "beta")), ("L(N)", ("E", "A", "alpha")), ("L(D)", ("E", "B", "beta")))


def run(workdir: str, loss: str = "total", data: str = "images_seen", bootstrap: int = 200, seed: int = 0,
        progress: bool = True, floor: str = "fit") -> tuple[dict, str]:
  """Fit the sweep in `workdir`; returns (fit.json's content, fit.md's text). Writes them (and the
  plots) even when no law is identifiable, then raises FitError saying why."""
  if bootstrap < 0:
    raise FitError(f"--bootstrap {bootstrap}: give 0 (no CIs) or more resamples (200 or more for 95% CIs).")
  source = io.path(workdir) / "sweep.jsonl"
  if not source.exists():
    raise FitError(f"{source} does not exist: run `klip sweep run --workdir {workdir}` first.")
  sweep = fit.read(io.read_text(source), loss, str(source))
  bar = (lambda it: tqdm(it, desc="bootstrap", unit="resample", leave=False)) if progress else None
  result = fit.fit_sweep(sweep, data, bootstrap, seed, bar, floor)
  for arm, runs in sweep.arms.items():
    prefix = f"{_slug(arm)}_" if len(sweep.arms) > 1 else ""
    result["arms"][arm]["plots"] = plots.write(io.path(workdir) / "plots", runs, result["arms"][arm], prefix)
  text = markdown(result, str(source))
  io.write_json(io.path(workdir) / "fit.json", result)
  io.write_text(io.path(workdir) / "fit.md", text)
  why = fit.refusal(result)
  if why:  # after writing: fit.md and the plots show the table the laws could not be fitted to
    raise FitError(f"{why} The table and each law's reason: {io.path(workdir) / 'fit.md'}, plots/.")
  return result, text


def _slug(arm: str) -> str:
  return re.sub(r"[^A-Za-z0-9.]+", "_", arm).strip("_")


def _num(v: float) -> str:
  return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.3e}"


def _cell(p: dict) -> str:
  ci = p["ci"]
  return _num(p["value"]) + (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else "")


def markdown(result: dict, source: str) -> str:
  lines = [f"# Scaling-law fit of {source}", ""]
  for arm, r in result["arms"].items():
    lines += _arm(arm, r)
  if result["failed"]:
    lines += ["## Failed points (in no fit)", "", "| point | error |", "|---|---|"]
    lines += [f"| {f['point']} | {f['error']} |" for f in result["failed"]]
    lines.append("")
  if result["notes"]:
    lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
  return "\n".join(lines)


def _arm(arm: str, r: dict) -> list[str]:
  rng = r["range"]
  out = [f"## {arm}: held-out {r['loss']} loss", "",
         f"{r['runs']} runs, {r['points']} points. N = non-embedding params, D = {r['data']}, "
         "C = cumulative XLA FLOPs. "
         f"95% CIs: percentile bootstrap, {r['bootstrap']} resamples of the runs within each model size (seed "
         f"{r['seed']}).", "",
         f"**Fitted range**: N {_num(rng['N'][0])}..{_num(rng['N'][1])}, D {_num(rng['D'][0])}..{_num(rng['D'][1])}, "
         f"C {_num(rng['C'][0])}..{_num(rng['C'][1])}; predictions outside it are marked (extrapolated).", "",
         "| law (Huber on log L, Chinchilla approach 3) | E | A | alpha | B | beta |", "|---|---|---|---|---|---|"]
  refused, partial = [], []
  zero = r["floor"] == "zero"
  for law, names in LAWS:
    evals = "each run's final eval" if r["data"] == "unique_images" else "every eval"
    title = {"L(N,D)": f"L(N, D) = {'' if zero else 'E + '}A/N^alpha + B/D^beta, {evals}",
             "L(N)": f"L(N) = E + A/N^alpha at D = {_num(r['L(N) at D'] or 0)}",
             "L(D)": f"L(D) = E + B/D^beta at N = {_num(r['L(D) at N'] or 0)}"}[law]
    entry = r[law]
    if not entry["identifiable"]:
      refused.append(f"- **{law} not identifiable**: {entry['reason']}")
      out.append(f"| {title} | not identifiable (below) | | | | |")
      continue
    cells = {n: _cell(entry["params"][n]) for n in names}
    if zero and law == "L(N,D)":
      cells["E"] = "0 (fixed)"
    out.append(f"| {title} | " + " | ".join(cells.get(n, "") for n in ("E", "A", "alpha", "B", "beta")) + " |")
    if entry["bootstrap_ok"] < r["bootstrap"]:
      partial.append(f"- {law}: CIs from the {entry['bootstrap_ok']} of {r['bootstrap']} resamples in which it "
                     "could be fitted (the others lacked 3 levels or points)")
  if zero:
    refused.append("- L(N, D)'s E is fixed at 0 (`--floor zero`): the reducible loss alone, for losses far above "
                   "any irreducible loss; it does not say where the loss stops falling. The slices' E holds the "
                   "other term.")
  out += [""] + refused + partial + ([""] if refused or partial else [])
  co = r["compute_optimal"]
  out.append("### Compute-optimal allocation (Chinchilla eq. 4)")
  out.append("")
  if co["identifiable"]:
    p = co["params"]
    out += [f"C ~ k N D with k = {_cell(p['k'])} FLOPs per parameter and image (geometric mean of C/(N D) over the "
            f"points); N_opt = G (C/k)^a, D_opt = G^-1 (C/k)^b with a = {_cell(p['a'])}, b = {_cell(p['b'])}, "
            f"G = {_cell(p['G'])}.", "", "| C | N_opt | D_opt | loss at the optimum | |", "|---|---|---|---|---|"]
    for row in co["predictions"]:
      flag = f"(extrapolated: {', '.join(row['extrapolated'])} outside the fitted range)" if row["extrapolated"] else ""
      out.append(f"| {_num(row['C'])} | {_cell(row['N_opt'])} | {_cell(row['D_opt'])} | {_cell(row['loss'])} "
                 f"| {flag} |")
  else:
    out.append(f"Not computed: {co['reason']}")
  iso = r["isoflop"]
  out += ["", "### IsoFLOP (Chinchilla approach 2)", ""]
  if iso["identifiable"]:
    out.append(f"N_opt ~ C^a with a = {_cell(iso['params']['a'])} (parabolas in log N per compute budget); compare "
               "a above.")
  else:
    out.append(f"Not identifiable: {iso['reason']}")
  if r.get("plots"):
    out += ["", "Plots: " + ", ".join(p.rsplit("/", 1)[-1] for p in r["plots"]) + " (in plots/)"]
  return out + [""]
