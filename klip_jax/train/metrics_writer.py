"""Where a run's numbers go: TensorBoard event files (WORKDIR/logs) and WORKDIR/metrics.jsonl.

Training metrics are logged as `train/<name>`; in-training evaluations as
`eval/<task>/<metric>` in TensorBoard and as `{"step": s, "eval": {task: {metric: value}}}`
lines in metrics.jsonl, so a reader can tell the two kinds of line apart.
"""

from __future__ import annotations

import os

from tensorboardX import SummaryWriter

from klip_jax import io


class MetricsWriter:
  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tensorboard = SummaryWriter(os.path.join(workdir, "logs"))

  def train(self, step: int, metrics: dict[str, float]) -> None:
    io.append_jsonl(self.path, {"step": step, **metrics})
    for name, value in metrics.items():
      self._tensorboard.add_scalar(f"train/{name}", value, step)
    self._tensorboard.flush()

  def eval(self, step: int, results: dict[str, dict[str, float]]) -> None:
    io.append_jsonl(self.path, {"step": step, "eval": results})
    for task, metrics in results.items():
      for name, value in metrics.items():
        self._tensorboard.add_scalar(f"eval/{task}/{name}", value, step)
    self._tensorboard.flush()

  def close(self) -> None:
    self._tensorboard.close()
