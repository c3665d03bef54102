"""XLA flags that `klip` commands start with, each chosen by measurement on our shapes.

XLA reads XLA_FLAGS once, when jax starts its backend, so the CLI applies these before any jax
work (`with_defaults`). A flag already named in the user's XLA_FLAGS is left as the user set it,
so any default can be overridden from the shell. Library users who call klip_jax from Python
get XLA's own defaults unless they set XLA_FLAGS themselves.

`--xla_cpu_experimental_ynn_fusion_type=` (empty: no YNNPACK fusions). jaxlib 0.10's XLA:CPU
hands dot products, reductions and the elementwise work around them to YNNPACK fusions by
default. On our transformer shapes its own emitters are faster: at the small config (ViT
384 x 6 at 224 px, text 384 x 6, batch 16) the train step ran 1.10x faster without them (median
of ten paired rounds in one process, nine of ten faster, on a 2-core AMD EPYC), with the same
losses; at configs/tiny.py it made no difference (1.00x). Only the CPU backend reads `xla_cpu_*`
flags; GPU and TPU runs are unaffected. To compare, set the flag yourself, e.g.
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot,reduce`.
"""

from __future__ import annotations

# (flag, value) in the order they are appended.
DEFAULTS: tuple[tuple[str, str], ...] = (
    ("xla_cpu_experimental_ynn_fusion_type", ""),
)


def _named(flags: str) -> set[str]:
  """The flag names an XLA_FLAGS string sets: "--a=1 --b" -> {"a", "b"}."""
  return {token.lstrip("-").split("=", 1)[0] for token in flags.split() if token.startswith("-")}


def with_defaults(flags: str) -> str:
  """`flags` (an XLA_FLAGS string) with each default appended that it does not set itself."""
  named = _named(flags)
  added = [f"--{name}={value}" for name, value in DEFAULTS if name not in named]
  return " ".join([flags.strip(), *added]).strip()
