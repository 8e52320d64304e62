"""alma_jax: anytime learning at macroscale in JAX."""
