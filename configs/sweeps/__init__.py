"""Scaling-law sweep configs for `klip sweep run` (installed as klip_jax.configs.sweeps)."""
