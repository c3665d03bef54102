"""The shipped configs (installed as klip_jax.configs): `get_config(arg)` files for --config."""
