"""Files a run reads and writes, on local disks and on object stores (gs://...) alike, written
so that a crash never leaves half of one.

Every path of a run (workdir, data_dir, tokenizer, export folder) goes through `path`: an
`etils.epath` path, so the same calls work on local disks and on the bucket paths pod jobs
write to. gs:// needs an fsspec filesystem for GCS: `pip install -e ".[gcs]"` (gcsfs, through
etils' `epath-gcs` extra; etils uses tf.io.gfile instead when TensorFlow is installed).

Every output (configs, metrics, caption overlays, reports, plots, exports, tokenizers) goes
through `atomic_path`: the content is written under a temporary name beside the target and
renamed over it only when complete, so a reader sees the old file (or folder) or the new one.
On an object store a rename is a server-side copy and delete: a single object still appears
whole (GCS replaces an object atomically), but a folder is moved object by object, so a crash
in the middle of that move can leave it partly replaced. Object stores have no append either
(gcsfs turns "a" into "w"), so `append_jsonl` rewrites a remote file whole.

Libraries that only open local files get a local stand-in: `local_atomic_path` for writers
(safetensors, save_pretrained), `local_copy` for readers. ArrayRecord datasets cannot be remote
at all (`data.builder.require_local`).

In a multi-process run only process 0 writes (`parallel.hosts.is_writer`): every process
computed the same content, and one writer avoids races on the same names. On the others the
write calls do nothing, and `atomic_path` hands out a scratch folder that is dropped afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from etils import epath

from klip_jax.errors import ConfigError
from klip_jax.parallel import hosts

PathLike = str | os.PathLike


def is_remote(p: PathLike) -> bool:
  """Whether `p` names an object (gs://, s3://, ...) rather than a file on this machine."""
  return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath path; for a remote one that nothing on this machine can open, a
  ConfigError naming the extra to install (instead of fsspec's ImportError from inside a
  write)."""
  if is_remote(p):
    _check_backend(os.fspath(p).split("://", 1)[0])
  return epath.Path(p)


def _check_backend(scheme: str) -> None:
  if _has_tensorflow() and os.environ.get("EPATH_USE_TF", "").lower() not in ("false", "no", "f", "0"):
    return  # etils uses tf.io.gfile, which reads and writes gs:// itself
  import fsspec

  try:
    fsspec.get_filesystem_class("gcs" if scheme == "gs" else scheme)
  except (ImportError, ValueError) as e:
    raise ConfigError(f"{scheme}:// paths need an fsspec filesystem for {scheme} ({e}). For gs:// install "
                      "klip_jax's gcs extra: pip install -e \".[gcs]\"") from None


@functools.cache
def _has_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def resolve(p: PathLike) -> epath.Path:
  """An absolute local path, or a remote one unchanged (os.path.abspath and epath's resolve
  would turn gs://b/run into CWD/gs:/b/run)."""
  return path(p) if is_remote(p) else epath.Path(os.path.abspath(p))


def replace(new: epath.Path, final: epath.Path) -> None:
  """Put the finished file or folder `new` at `final`; a folder already at `final` is moved
  aside first and deleted once `new` is in place, so `final` is never missing a whole version."""
  if final.is_dir():
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    final.rename(old)
    new.rename(final)
    old.rmtree()
  else:
    new.replace(final)


def _folder_in_the_way(final: epath.Path) -> IsADirectoryError:
  return IsADirectoryError(errno.EISDIR, "a folder is there, where a file is to be written; give a file's path",
                           str(final))


@contextlib.contextmanager
def atomic_path(p: PathLike, *, folder: bool = False) -> Iterator[epath.Path]:
  """Yield a temporary path beside `p`; on success rename it to `p` (replacing a file, or with
  `folder` a folder, already there), on failure remove it and leave `p` as it was. On a process
  that does not write (`hosts.is_writer`), a path in a scratch folder that is dropped afterwards.
  A file is never written over a folder: `--json results/` naming the user's folder would
  otherwise delete it; that is an IsADirectoryError, before anything is written.

  Remote: the rename is a copy and delete on the server; atomic for a file (an object), not
  for a folder (see the module docstring). Writing the target directly would not be safer:
  gcsfs uploads what was written when the file is closed, even when closing on an exception."""
  final = path(p)
  if not folder and final.is_dir():
    raise _folder_in_the_way(final)
  if not hosts.is_writer():
    scratch = tempfile.mkdtemp(prefix="klip-not-written-")
    try:
      yield epath.Path(scratch) / final.name
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
    return
  final.parent.mkdir(parents=True, exist_ok=True)  # a no-op on GCS, which has no folders
  tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    yield tmp
    replace(tmp, final)
  finally:
    if tmp.is_dir():
      tmp.rmtree()
    elif tmp.exists():
      tmp.unlink()


@contextlib.contextmanager
def local_atomic_path(p: PathLike, *, folder: bool = False) -> Iterator[epath.Path]:
  """`atomic_path` whose yielded path is always on this machine, for writers that only take
  local file names (safetensors, transformers' save_pretrained). For a remote `p` the finished
  file or folder is uploaded beside it, then renamed into place."""
  if not is_remote(p) or not hosts.is_writer():
    with atomic_path(p, folder=folder) as tmp:
      yield tmp
    return
  final = path(p)
  with tempfile.TemporaryDirectory(prefix="klip-upload-") as scratch:
    local = epath.Path(scratch) / final.name
    yield local
    with atomic_path(final, folder=folder) as tmp:
      _copy(local, tmp)


@contextlib.contextmanager
def local_copy(p: PathLike) -> Iterator[epath.Path]:
  """`p` itself when it is local; else a local copy of the remote file or folder, removed
  afterwards, for readers that only open local files (a missing `p` stays missing, for the
  reader to report)."""
  if not is_remote(p):
    yield epath.Path(p)
    return
  source = path(p)
  with tempfile.TemporaryDirectory(prefix="klip-download-") as scratch:
    local = epath.Path(scratch) / source.name
    if source.exists():
      _copy(source, local)
    yield local


def _copy(source: epath.Path, target: epath.Path) -> None:
  """Copy a file or folder between any two backends (epath's own copy picks the backend from
  the source alone, so it cannot upload a local file)."""
  if source.is_dir():
    target.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
      _copy(child, target / child.name)
  else:
    with source.open("rb") as src, target.open("wb") as dst:
      shutil.copyfileobj(src, dst, 16 << 20)


def check_writable(p: PathLike) -> None:
  """Raise now the OSError a write of the file `p` would raise after the work that produces it
  (a read-only or full disk, a file where its folder belongs, a folder at `p`): an empty file
  is written beside `p` and removed; `p` itself is left as it is."""
  final = path(p)
  if final.is_dir():
    raise _folder_in_the_way(final)
  probe = final.parent / f".{final.name}.writable-{uuid.uuid4().hex[:8]}"
  write_text(probe, "")
  if hosts.is_writer():
    probe.unlink()


def write_text(p: PathLike, text: str) -> None:
  with atomic_path(p) as tmp:
    tmp.write_text(text)


def write_bytes(p: PathLike, data: bytes) -> None:
  with atomic_path(p) as tmp:
    tmp.write_bytes(data)


def write_json(p: PathLike, value: Any) -> None:
  write_text(p, json.dumps(value, indent=2) + "\n")


def write_jsonl(p: PathLike, rows: Iterable[dict]) -> None:
  write_text(p, "".join(json.dumps(row) + "\n" for row in rows))


def append_jsonl(p: PathLike, row: dict) -> None:
  """Append one line (a log: a crash loses at most the line being written). Object stores
  cannot append, so a remote file is read and rewritten whole (atomically): one small request
  pair per logged step, fine for a metrics log of a few thousand lines."""
  if not hosts.is_writer():
    return
  line = json.dumps(row) + "\n"
  target = path(p)
  if is_remote(p):
    write_text(target, (target.read_text() if target.exists() else "") + line)
    return
  with target.open("a") as f:
    f.write(line)


def exists(p: PathLike) -> bool:
  return path(p).exists()


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def read_json(p: PathLike) -> Any:
  return json.loads(read_text(p))


def read_jsonl(p: PathLike) -> list[dict]:
  return [json.loads(line) for line in read_text(p).splitlines() if line.strip()]
