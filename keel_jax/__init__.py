"""Keel: extremely deep Post-LN language models in JAX/Flax (arXiv 2601.19895)."""

from keel_jax import platforms as _platforms

# Before any module of the package imports JAX's backends: no libtpu start-up errors off TPU hosts.
_platforms.skip_tpu_without_tpu()
