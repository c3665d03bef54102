"""Model FLOPs of the train and relabel steps: what MFU, `klip compile`'s step time at peak and
the scaling sweeps' compute axis count.

The count is XLA's cost analysis of the step lowered for shape-only inputs (nothing allocated
or compiled), with choices that make it the model's arithmetic on every backend and layout:
- the layers unrolled: the cost analysis counts a scanned stack's loop body once (configs/base.py's
  train step at batch 64: 4.3 TFLOP scanned against 47.8 unrolled; a compiled TPU program
  likewise), and unrolling changes no arithmetic;
- no remat: jax writes remat's recomputation into the lowered program (tiny.py with full remat:
  7.3 GFLOP against 5.6), and MFU counts the model's FLOPs, not the recomputed ones;
- XLA's attention: cuDNN's fused attention is a custom call that the cost analysis cannot see
  into, and the CPU lowering has no cuDNN;
- the reconstruction loss's vocabulary projection at every position: the step projects only
  the scored positions unless a caption scores more than half of its own
  (`losses.reconstruction_at_selected`, a conditional), and XLA's cost analysis counts a
  conditional's costlier branch. The usual branch does less: configs/demo.py's step, 8.48 GFLOP
  counted, does 7.85 (vocabulary 1000); at base.py's widths the projection is under 1% of the step;
- one CPU device holding the global batch: the CPU lowering always carries a cost analysis (on
  an H200, jax 0.11's CUDA lowering returned no FLOPs count), and it is the whole step's, before
  any partitioning (MFU counts no replicated work).
Lowering base.py's unrolled train step takes ~18 s on a 2-core CPU, so counts are cached per
config.
"""

from __future__ import annotations

import jax
import ml_collections

from klip_jax.bench import inputs
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import relabel as relabel_lib
from klip_jax.train import step as step_lib


def train_step(config: ml_collections.ConfigDict, vocab_size: int) -> float:
  """FLOPs of one train step (SCIO stage A's) at config.train.batch_size, the global batch."""
  return _count(config, vocab_size, "train", config.train.batch_size)


def relabel_step(config: ml_collections.ConfigDict, vocab_size: int, batch_size: int) -> float:
  """FLOPs of one relabel step (screening and proofreading) of `batch_size` captions: a lower
  bound, since proofreading's token-by-token decoding is a loop whose body is counted once."""
  return _count(config, vocab_size, "relabel", batch_size)


_COUNTS: dict[tuple, float] = {}


def _count(config: ml_collections.ConfigDict, vocab_size: int, step: str, batch_size: int) -> float:
  config = config.copy_and_resolve_references()
  for tower in (config.model.vision, config.model.text):
    tower.update(scan_layers=False, remat="none", attention="xla")  # the same arithmetic: one count for all
  key = (config.to_json_best_effort(sort_keys=True), vocab_size, step, batch_size)
  if key not in _COUNTS:
    _COUNTS[key] = _lowered_flops(config, vocab_size, step, batch_size)
  return _COUNTS[key]


def _lowered_flops(config: ml_collections.ConfigDict, vocab_size: int, step: str, batch_size: int) -> float:
  mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices("cpu")[:1], dcn_shape=(1, 1, 1))
  tokens = inputs.token_ids(vocab_size)
  graph, tx, schedule, shardings, state = inputs.abstract_state(config, vocab_size, mesh)
  batch = inputs.abstract_batch(config, mesh_lib.batch_sharding(mesh), batch_size)
  rng = inputs.abstract_rng(mesh)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    if step == "train":
      lowered = step_lib.make_train_step(config, graph, tx, schedule, tokens, shardings, mesh).lower(state, batch, rng)
    else:
      lowered = relabel_lib.make_relabel_step(config, graph, tokens, shardings.params, mesh).lower(
          state.params, batch, rng)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])
