"""Pallas serving kernels for grc_jax (TPU via Mosaic, GPU via Triton) and their XLA references."""
