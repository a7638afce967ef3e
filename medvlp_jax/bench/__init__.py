"""Benchmarks: `python -m medvlp_jax.bench NAME [args]`; each prints one JSON object (`parity`:
the README's Markdown table of parity figures, its JSON with `--out`)."""
