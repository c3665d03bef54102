"""Where a step's time goes: a jax.profiler trace of a few train steps (open it in
TensorBoard's profile plugin or Perfetto), summarised here as the ops that took the most time,
read back from the trace with `jax.profiler.ProfileData`."""

from __future__ import annotations

import collections
import glob
import os
import re

import jax


def trace(run, out_dir: str) -> str:
  """Run `run()` (which must block until its work is done) under the profiler -> trace path."""
  with jax.profiler.trace(out_dir):
    run()
  paths = sorted(glob.glob(os.path.join(out_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no trace under {out_dir}")
  return paths[-1]


def top_ops(path: str, count: int = 15, calls: int = 1) -> list[dict]:
  """The `count` kinds of op with the most total time in the trace's XLA op lines, per call
  (`calls`: how many steps the trace covers), each with its share of all op time. A kind is
  an op's name without XLA's instance number (`ynn_fusion.1147` -> `ynn_fusion`: YNNPACK
  matmul fusions on CPU), so a step's thousand small fusions add up to what they are."""
  data = jax.profiler.ProfileData.from_file(path)
  totals: collections.Counter = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      # Accelerators record ops on "XLA Ops" lines; XLA:CPU on its Eigen worker threads, each op
      # inside a ThunkExecutor span that is not an op itself.
      if line.name != "XLA Ops" and not line.name.startswith("tf_XLAEigen"):
        continue
      for event in line.events:
        if not event.name.startswith("ThunkExecutor"):
          totals[re.sub(r"\.\d+$", "", event.name)] += event.duration_ns
  everything = sum(totals.values()) or 1
  return [{"op": name, "ms_per_step": ns / 1e6 / calls, "share": ns / everything}
          for name, ns in totals.most_common(count)]
