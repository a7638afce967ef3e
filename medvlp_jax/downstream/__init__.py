"""Downstream tasks of a pre-trained run: classification, segmentation and detection, one
protocol for every method (`python -m medvlp_jax.downstream`; see `runner`)."""
