"""alma_jax: anytime learning at macroscale in JAX."""

__version__ = '0.9.10'
