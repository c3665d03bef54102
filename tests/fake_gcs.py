"""An in-memory stand-in for Google Cloud Storage behind etils.epath's gs:// paths, so tests
exercise the remote code paths without a network or gcsfs.

It behaves like GCS (and gcsfs) where that matters to klip_jax: a flat map of object names,
folders that exist only while objects lie under them (mkdir does nothing), no append (like
gcsfs, "a" silently becomes "w"), and a rename that copies then deletes, object by object.
The `fake_gcs` fixture (tests/conftest.py) registers it as fsspec's gs:// filesystem, where
etils' fsspec backend finds it, and empties it between tests.
"""

from __future__ import annotations

import io
import warnings

import fsspec


class FakeGCS(fsspec.AbstractFileSystem):
  protocol = ("gs", "gcs")
  root_marker = ""
  store: dict[str, bytes] = {}  # object name "bucket/key" -> bytes; emptied by the fixture

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return path.rstrip("/")

  def _is_folder(self, path: str) -> bool:
    return "/" not in path or any(name.startswith(path + "/") for name in self.store)

  def info(self, path, **kwargs):
    path = self._strip_protocol(path)
    if path in self.store:
      return {"name": path, "size": len(self.store[path]), "type": "file"}
    if self._is_folder(path):
      return {"name": path, "size": 0, "type": "directory"}
    raise FileNotFoundError(path)

  def ls(self, path, detail=True, **kwargs):
    path = self._strip_protocol(path)
    if path in self.store:
      entries = [self.info(path)]
    else:
      if not self._is_folder(path):
        raise FileNotFoundError(path)
      children = {path + "/" + name[len(path) + 1:].split("/")[0]
                  for name in self.store if name.startswith(path + "/")}
      entries = [self.info(child) for child in sorted(children)]
    return entries if detail else [e["name"] for e in entries]

  def makedirs(self, path, exist_ok=False):
    pass  # GCS has no folders

  def mkdir(self, path, create_parents=True, **kwargs):
    pass

  def rmdir(self, path):
    pass

  def cp_file(self, path1, path2, **kwargs):
    path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
    if path1 in self.store:
      self.store[path2] = self.store[path1]
    elif not self._is_folder(path1):
      raise FileNotFoundError(path1)

  def rm_file(self, path):
    self.store.pop(self._strip_protocol(path), None)

  def _open(self, path, mode="rb", **kwargs):
    path = self._strip_protocol(path)
    if "r" in mode:
      if path not in self.store:
        raise FileNotFoundError(path)
      return io.BytesIO(self.store[path])
    if "a" in mode:
      warnings.warn("Append mode 'a' is not supported in GCS. Using overwrite mode instead.", stacklevel=2)
    return _Upload(self.store, path)


class _Upload(io.BytesIO):
  """An object being written: it appears, whole, when the file is closed (even when closed by
  an exception, as gcsfs's files do)."""

  def __init__(self, store: dict, name: str):
    super().__init__()
    self._store, self._name = store, name

  def close(self):
    if not self.closed:
      self._store[self._name] = self.getvalue()
    super().close()
