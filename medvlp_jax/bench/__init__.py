"""Benchmarks: `python -m medvlp_jax.bench NAME [args]`; each prints one JSON object."""
