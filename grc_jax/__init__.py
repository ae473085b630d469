"""grc_jax: one decoder LLM that generates, embeds and compresses text (GRC), in JAX/Flax."""

__version__ = "0.1.0"
