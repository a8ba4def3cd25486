"""Benchmarks of optaxderived against optax, side by side (``python -m benchmarks``)."""
