"""Evaluation protocols on embeddings: zero-shot, retrieval, linear probe, and their metrics."""
