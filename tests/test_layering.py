"""The package's layering: imports point down (cli -> jobs -> train / eval / export / bench ->
model / data / parallel; bench above export), checked on every import statement, function-local ones included, and
on what importing the lower layers actually loads."""

import ast
import os
import subprocess
import sys

import klip_jax

PACKAGE = os.path.dirname(klip_jax.__file__)

# Layer -> packages it must never import (io, config, errors and compilations are usable from
# anywhere). bench sits above export: its PyTorch comparison builds HF BLIP through export's mapping.
FORBIDDEN = {
    "model": ("train", "eval", "export", "jobs", "cli", "bench", "data"),
    "data": ("train", "eval", "export", "jobs", "cli", "bench", "model"),
    "parallel": ("train", "eval", "export", "jobs", "cli", "bench", "model", "data"),
    "train": ("eval", "export", "jobs", "cli", "bench"),
    "eval": ("export", "jobs", "cli", "bench", "train.loop"),
    "export": ("eval", "jobs", "cli", "bench", "train.loop"),
    "bench": ("eval", "jobs", "cli"),
    "jobs": ("cli",),
    "sweep": ("train", "eval", "export", "jobs", "cli", "bench", "model", "data", "parallel"),
}


def _modules() -> dict[str, str]:
  """Dotted name -> file of every module in klip_jax."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, name), os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = os.path.join(root, name)
  return out


def _imports(path: str, module: str) -> set[str]:
  """Every klip_jax module `path` imports, at any depth of its code."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolve against the importing module's package
        base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
      found |= {base} | {f"{base}.{a.name}" for a in node.names}
  return {name for name in found if name.startswith("klip_jax")}


def _violations(modules: dict[str, str]) -> list[str]:
  bad = []
  for module, path in modules.items():
    parts = module.split(".")
    layer = parts[1] if len(parts) > 1 else ""
    for target in _imports(path, module):
      rel = target.removeprefix("klip_jax.")
      if any(rel == f or rel.startswith(f + ".") for f in FORBIDDEN.get(layer, ())):
        bad.append(f"{module} imports {target}")
  return bad


def test_every_import_points_down():
  modules = _modules()
  assert {"klip_jax.cli", "klip_jax.jobs.pretrain", "klip_jax.train.loop", "klip_jax.eval.registry",
          "klip_jax.model.klip", "klip_jax.data.world"} <= set(modules)
  assert _violations(modules) == []


def test_the_check_catches_an_upward_import(tmp_path):
  """The checker itself: a data module importing the training loop is flagged."""
  path = tmp_path / "bad.py"
  path.write_text("def f():\n  from klip_jax.train import loop\n  from ..eval import suite\n")
  assert sorted(_violations({"klip_jax.data.bad": str(path)})) == [
      "klip_jax.data.bad imports klip_jax.eval", "klip_jax.data.bad imports klip_jax.eval.suite",
      "klip_jax.data.bad imports klip_jax.train", "klip_jax.data.bad imports klip_jax.train.loop"]


def test_importing_the_lower_layers_loads_nothing_above_them():
  lower = [m for m in _modules() if m.split(".")[1:2] and m.split(".")[1] in ("model", "data", "parallel")]
  code = (f"import sys\nfor m in {lower!r}: __import__(m)\n"
          "print('\\n'.join(sorted(m for m in sys.modules if m.startswith(('klip_jax.train', 'klip_jax.eval', "
          "'klip_jax.export', 'klip_jax.jobs', 'klip_jax.cli', 'klip_jax.bench')))))")
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip() == ""
  code = ("import sys, klip_jax.train.loop, klip_jax.train.scio\n"
          "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('klip_jax.eval'))))")
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip() == ""
