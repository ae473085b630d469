"""Pieces of `python -m grc_jax.evaluate`: input readers, metrics, tasks and the report."""
