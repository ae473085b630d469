"""Every layer's attention probabilities of a forward pass, for inspecting what a reader attends
to (which memory, which of its latents, its own prompt).

Built on the model's own layer loop (`grc_jax.model.run_layers`) with an attention function
that runs the forward pass's attention and also returns its probabilities, so the hidden states
each layer hands on are exactly the forward pass's. For inspection only: training and serving
never compute these, and they take [layers, batch, heads, length, length] of memory.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grc_jax import layout, model
from grc_jax.config import ModelConfig


def attention_probabilities(
    config: ModelConfig,
    params: model.Params,
    tokens: jax.Array,
    meta: layout.TokenMeta,
    memory_bias: jax.Array | None = None,
) -> jax.Array:
    """float32 [layers, batch, q_heads, length, length] under the GRC rule; memory_bias as in
    `grc_jax.model.forward` (float [batch, length]: added to every READER's logits on each LATENT key)."""
    mask = layout.attention_mask(meta)
    bias = None if memory_bias is None else model.reader_latent_bias(meta, memory_bias)

    def recording(layer: Any, q: jax.Array, k: jax.Array, v: jax.Array, carry: Any) -> tuple[jax.Array, Any, jax.Array]:
        k_per_q_head = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
        scores = jnp.einsum("bthd,bshd->bhts", q, k_per_q_head).astype(jnp.float32) / np.sqrt(q.shape[-1])
        if bias is not None:
            scores = scores + bias[:, None]
        probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)
        # The next layer's input exactly as the forward pass computes it, not rebuilt from probs.
        return model.attend(q, k, v, mask, bias), carry, probs

    cos, sin = model.rope_cos_sin(config, layout.positions(meta, config.max_segment_len, config.num_latents))
    x = model.embed_tokens(config, params, jnp.asarray(tokens))
    return model.run_layers(config, params["layers"], x, cos, sin, recording)[2]
