"""Shared fixtures. Eight virtual CPU devices are set up before anything imports jax, so
multi-device code is tested on a (data, fsdp, tensor) mesh on any machine."""

import atexit
import os
import shutil
import tempfile

from tests import xla  # jax-free: these flags are set before anything imports jax

os.environ.setdefault("XLA_FLAGS", xla.host_devices_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # Tests compile the same tiny programs many times over (each `klip` subprocess, each stage,
  # each pytest-xdist worker), and compiling is most of a tiny run's time: one persistent XLA
  # cache per session, which the subprocesses and workers inherit through the environment.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache = tempfile.mkdtemp(prefix="klip-jax-test-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  # Every program, the smallest too: orbax slices each parameter on each device when it saves,
  # ~120 compilations of ~0.05 s in every `klip train` process on 8 devices (5 s of a 45 s run).
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Most tests run a program a few times and compile it once, so XLA's optimizing passes cost them
# more than they save: without them a 6-step online SCIO run (configs/tiny.py:48px, 8 devices)
# took 53 s instead of 82 s, compiling its train step in 11.5 s instead of 22.8 s. Every `klip`
# command a user runs keeps them; so do the tests that run hundreds of steps (`tests.xla`). They
# also compile with tests.xla.COMPILE_FAST_FLAGS.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pytest
from etils.epath import backend as epath_backend
from fsspec.registry import _registry as fsspec_registry

from klip_jax.data import builder, records, tokenizer, world
from tests.fake_gcs import FakeGCS

TINY_WORLD = world.WorldConfig(image_size=48, resolution_m=(2.0, 10.0), max_targets=4)
TINY_SETTINGS = builder.SynthSettings({"train": 48, "val": 12, "test": 12}, seed=3,
                                      noise_rate=0.25, world=TINY_WORLD)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
  """A tiny synthetic dataset (48/12/12 chips of 48 px), built once per test session."""
  data_dir = tmp_path_factory.mktemp("tiny_data")
  builder.build(data_dir, TINY_SETTINGS)
  return str(data_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_data, tmp_path_factory) -> str:
  source = builder.open_split(tiny_data, "train")
  captions = [records.from_example(source[i], decode_rasters=False)["caption"] for i in range(len(source))]
  # Add every template and vocabulary value once so all pieces are seen.
  from tests.data.text_cases import all_template_captions
  path = tmp_path_factory.mktemp("tok") / "tok.model"
  tokenizer.train_sentencepiece(captions + [c for c, _ in all_template_captions()], 1000, path)
  return str(path)


@pytest.fixture
def fake_gcs(monkeypatch) -> dict:
  """gs:// paths served by an empty in-memory GCS (tests/fake_gcs.py) for one test; yields its
  object store (name "bucket/key" -> bytes). TensorFlow, when installed, is kept out of the way
  (etils would use tf.io.gfile for gs:// otherwise)."""
  monkeypatch.setenv("EPATH_USE_TF", "false")
  for name in ("gs", "gcs"):
    monkeypatch.setitem(fsspec_registry, name, FakeGCS)
  monkeypatch.setattr(FakeGCS, "store", {})
  FakeGCS.clear_instance_cache()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # etils keeps the filesystem it made
  yield FakeGCS.store
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  FakeGCS.clear_instance_cache()


def pytest_configure(config):
  """Under --dist loadgroup, pytest-xdist keeps each xdist_group on one worker by tagging its
  tests' node ids; pytest 9.2's structured node ids drop the tag (pytest-xdist#1386), and the
  groups spread over workers without a word: the 2-process runs then overlap and starve
  jax.distributed's heartbeats, and shared fixtures are built on every worker."""
  if config.getoption("dist", "no") == "loadgroup" and _release(pytest.__version__) >= (9, 2):
    raise pytest.UsageError(f"pytest {pytest.__version__} makes pytest-xdist ignore xdist_group (pytest-xdist#1386): "
                            "pip install 'pytest<9.2' (setup.py's test extra pins it), or run with -n 0.")


def _release(version: str) -> tuple[int, ...]:
  """"9.2.0.dev340+g6a0de9be5" -> (9, 2)."""
  return tuple(int(part) for part in version.split(".")[:2])


def pytest_collection_modifyitems(items):
  """The slow tier first, the multi-process runs (the longest) before all: pytest-xdist workers
  take tests in this order, so the long ones start early and the short ones fill the gaps."""
  items.sort(key=lambda item: (item.get_closest_marker("slow") is None, "multihost" not in item.nodeid))
