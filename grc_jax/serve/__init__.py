"""`python -m grc_jax.serve`: an OpenAI-compatible HTTP server for generation, embeddings and
GRC memories over one model, with continuous batching (`grc_jax.inference.scheduler`) and a
durable memory bank (`MemoryBank.open`)."""

from grc_jax.serve.app import create_app
from grc_jax.serve.worker import Worker

__all__ = ["Worker", "create_app"]
