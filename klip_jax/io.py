"""Files a run writes, written so that a crash never leaves half of one.

Every output (configs, metrics, caption overlays, reports, plots, exports, tokenizers) goes
through `atomic_path`: the content is written under a temporary name beside the target and
renamed over it only when complete, so a reader sees the old file (or folder) or the new one.
Paths are `etils.epath` paths, so the same calls work on local disks and on the bucket paths
(gs://...) pod jobs write to.

In a multi-process run only process 0 writes (`parallel.hosts.is_writer`): every process
computed the same content, and one writer avoids races on the same names. On the others the
write calls do nothing, and `atomic_path` hands out a scratch folder that is dropped afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from etils import epath

from klip_jax.parallel import hosts

PathLike = str | os.PathLike


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[epath.Path]:
  """Yield a temporary path beside `path`; on success rename it to `path` (replacing a file or
  folder already there), on failure remove it and leave `path` as it was. On a process that
  does not write (`hosts.is_writer`), a path in a scratch folder that is dropped afterwards."""
  final = epath.Path(path)
  if not hosts.is_writer():
    scratch = tempfile.mkdtemp(prefix="klip-not-written-")
    try:
      yield epath.Path(scratch) / final.name
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
    return
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    yield tmp
    if final.is_dir():
      old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
      final.rename(old)
      tmp.rename(final)
      old.rmtree()
    else:
      tmp.replace(final)
  finally:
    if tmp.is_dir():
      tmp.rmtree()
    elif tmp.exists():
      tmp.unlink()


def write_text(path: PathLike, text: str) -> None:
  with atomic_path(path) as tmp:
    tmp.write_text(text)


def write_bytes(path: PathLike, data: bytes) -> None:
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)


def write_json(path: PathLike, value: Any) -> None:
  write_text(path, json.dumps(value, indent=2) + "\n")


def write_jsonl(path: PathLike, rows: Iterable[dict]) -> None:
  write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def append_jsonl(path: PathLike, row: dict) -> None:
  """Append one line (a log: a crash loses at most the line being written)."""
  if not hosts.is_writer():
    return
  with epath.Path(path).open("a") as f:
    f.write(json.dumps(row) + "\n")


def read_json(path: PathLike) -> Any:
  return json.loads(epath.Path(path).read_text())


def read_jsonl(path: PathLike) -> list[dict]:
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]
