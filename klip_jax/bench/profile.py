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


def op_times(data) -> collections.Counter:
  """Total ns per kind of op in a `jax.profiler.ProfileData`. A kind is a name without its
  instance number (`ynn_fusion.1147` -> `ynn_fusion`: YNNPACK matmul fusions on CPU;
  `loop_fusion_12` -> `loop_fusion` on a GPU), so a step's thousand small fusions add up to what
  they are.

  An op's execution is an event with an `hlo_op` stat: XLA:CPU's thunks (on its client and
  Eigen threads; the ThunkExecutor spans around them carry none), or a GPU kernel on the device
  plane's stream lines. A GPU kernel is named by itself, not by its `hlo_op`: XLA replays most of
  a step as CUDA graphs, whose kernels all carry one `command_buffer_N`. A device plane with an
  "XLA Ops" line (TPUs) is read from that line alone. Where a trace has device planes, host
  planes are left out, so an op's launch on the host does not count beside its run."""
  planes = [(p.name, list(p.lines)) for p in data.planes]  # a plane's lines view is truthy even when empty
  planes = [(name, lines) for name, lines in planes if name.startswith("/device:") and lines] or planes
  totals: collections.Counter = collections.Counter()
  for _, lines in planes:
    ops_line = [line for line in lines if line.name == "XLA Ops"]
    for line in ops_line or lines:
      for event in line.events:
        if ops_line or "hlo_op" in dict(event.stats):
          totals[re.sub(r"[._]\d+$", "", event.name)] += event.duration_ns
  return totals


def top_ops(path: str, count: int = 15, calls: int = 1) -> list[dict]:
  """The `count` kinds of op with the most total time in the trace (`op_times`), per call
  (`calls`: how many steps the trace covers), each with its share of all op time."""
  totals = op_times(jax.profiler.ProfileData.from_file(path))
  everything = sum(totals.values()) or 1
  return [{"op": name, "ms_per_step": ns / 1e6 / calls, "share": ns / everything}
          for name, ns in totals.most_common(count)]
