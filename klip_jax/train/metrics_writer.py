"""Where a run's numbers go: TensorBoard event files (WORKDIR/logs) and WORKDIR/metrics.jsonl.

Training metrics are logged as `train/<name>`; in-training evaluations as
`eval/<task>/<metric>` in TensorBoard and as `{"step": s, "eval": {task: {metric: value}}}`
lines in metrics.jsonl, so a reader can tell the two kinds of line apart. In a multi-process
run only process 0 writes them (the metrics are global, the same on every process).
A gs:// workdir works for both: metrics.jsonl through `io` (rewritten whole per line, as
buckets cannot append), the event files through tensorboardX's own GCS writer, which needs
google-cloud-storage (in the gcs extra) and re-uploads the events file on every flush.
"""

from __future__ import annotations

from tensorboardX import SummaryWriter

from klip_jax import io
from klip_jax.parallel import hosts


class MetricsWriter:
  def __init__(self, workdir: str, start: int = 0):
    """`start`: the step a resumed run restarts from. Lines logged after it (by a run killed
    between checkpoints) are dropped, as those steps run and log again: the log of an
    interrupted run reads as that of an uninterrupted one."""
    self.path = io.path(workdir) / "metrics.jsonl"
    self._tensorboard = SummaryWriter(str(io.path(workdir) / "logs")) if hosts.is_writer() else None
    if self._tensorboard is not None and self.path.exists():
      lines = io.read_jsonl(self.path)
      kept = [line for line in lines if line["step"] <= start]
      if len(kept) < len(lines):
        io.write_jsonl(self.path, kept)

  def train(self, step: int, metrics: dict[str, float]) -> None:
    self._write(step, {"step": step, **metrics}, {f"train/{name}": v for name, v in metrics.items()})

  def eval(self, step: int, results: dict[str, dict[str, float]]) -> None:
    self._write(step, {"step": step, "eval": results},
                {f"eval/{task}/{name}": v for task, metrics in results.items() for name, v in metrics.items()})

  def _write(self, step: int, line: dict, scalars: dict[str, float]) -> None:
    if self._tensorboard is None:
      return
    io.append_jsonl(self.path, line)
    for tag, value in scalars.items():
      self._tensorboard.add_scalar(tag, value, step)
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
