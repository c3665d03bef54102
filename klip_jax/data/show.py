"""A contact sheet of chips with their captions: the quickest way to look at a dataset."""

from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from klip_jax import io
from klip_jax.data import builder, knowledge, records


def contact_sheet(data_dir: str, split: str, indices: list[int], out_path: str) -> None:
  """Save chips (dB, 1-99.5 percentile stretch, target boxes in red) with their captions.

  Corrupted clauses (when the dataset records them) are marked with their true keyword.
  """
  source = builder.open_split(data_dir, split)
  cols = min(3, len(indices))
  rows = -(-len(indices) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 8.2 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, index in zip(axes.flat, indices):
    r = records.from_example(source[index])
    db = builder.to_db(r["image"])
    ax.imshow(db, cmap="gray", vmin=np.nanpercentile(db, 1), vmax=np.nanpercentile(db, 99.5))  # NaN: no data
    for x0, y0, x1, y1 in r["truth"]["boxes"]:
      ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="red", lw=0.8))
    geo = r["geo"]
    incidence = "unknown" if np.isnan(geo["incidence_deg"]) else f"{geo['incidence_deg']:.0f}°"
    title = (f"{r['id']}  {geo['city']}, {geo['country']}\n{geo['platform']} {geo['band']}-{geo['polarization']} "
             f"{geo['resolution_m']:.1f} m  inc {incidence}  {geo['acquired']}")
    ax.set_title(title, fontsize=8)
    truth = dict(zip(r["truth"]["corrupted"].tolist(), r["truth"]["true_keywords"]))
    clauses = []
    for i, clause in enumerate(r["caption"].split(knowledge.SEPARATOR)):
      mark = f"  [WRONG, true: {truth[i]}]" if i in truth else ""
      clauses.append(textwrap.fill(f"{i}. {clause}{mark}", 75))
    ax.text(0, -0.02, "\n".join(clauses), transform=ax.transAxes, va="top", fontsize=6.5, family="monospace")
  fig.tight_layout()
  with io.atomic_path(out_path) as tmp, tmp.open("wb") as f:
    fig.savefig(f, dpi=90, format="png")
  plt.close(fig)

