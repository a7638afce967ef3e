"""Pure loss functions (float32 inside, shapes in each docstring)."""
