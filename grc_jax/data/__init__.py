"""Data utilities for grc_jax, including the built-in synthetic demo world."""
