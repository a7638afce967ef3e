"""PRIOR: global + local alignment, sentence prototype bank, cross-modal reconstruction."""
