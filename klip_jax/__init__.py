"""klip_jax: knowledge-guided SAR vision-language pretraining (FUSAR-KLIP) in JAX/Flax."""

__version__ = "0.1.0"
