"""medvlp_jax: medical vision-language pre-training and prompt learning in JAX/Flax."""

__version__ = "0.1.0"
