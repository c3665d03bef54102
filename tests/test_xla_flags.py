"""The XLA flags `klip` starts with: added unless the user set them, and honoured by XLA."""

import os
import subprocess
import sys

from klip_jax import xla_flags

# A dot followed by a row reduction of 384 elements, as in every transformer layer.
_COMPILE = """
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.mean(jnp.tanh(x @ w), axis=-1))
text = f.lower(jnp.ones((64, 384)), jnp.ones((384, 384))).compile().as_text()
print("ynn" in text.lower())
"""


def test_defaults_are_appended_to_the_users_flags():
  assert xla_flags.with_defaults("") == "--xla_cpu_experimental_ynn_fusion_type="
  assert xla_flags.with_defaults(" --xla_force_host_platform_device_count=8 ") == (
      "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=")


def test_a_flag_the_user_set_is_left_as_set():
  mine = "--xla_cpu_experimental_ynn_fusion_type=dot --xla_force_host_platform_device_count=4"
  assert xla_flags.with_defaults(mine) == mine
  assert xla_flags.with_defaults("-xla_cpu_experimental_ynn_fusion_type") == "-xla_cpu_experimental_ynn_fusion_type"


def _uses_ynnpack(flags: str) -> bool:
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile for real: a cached executable proves nothing
  out = subprocess.run([sys.executable, "-c", _COMPILE], env=env, check=True, capture_output=True, text=True)
  return out.stdout.strip().splitlines()[-1] == "True"


def test_xla_compiles_without_ynnpack_fusions_under_the_defaults():
  """XLA aborts on a flag it does not know, so this also guards a jaxlib upgrade renaming it."""
  assert _uses_ynnpack("")  # XLA's own default fuses into YNNPACK: the flag has something to change
  assert not _uses_ynnpack(xla_flags.with_defaults(""))


def test_the_klip_command_starts_with_the_defaults(monkeypatch):
  from klip_jax import cli

  seen = {}

  def main():
    seen["flags"] = os.environ["XLA_FLAGS"]
    return 0

  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  monkeypatch.setattr(cli, "main", main)
  assert cli.run() == 0
  assert seen["flags"] == "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type="
