"""Memory priors (docs/design.md section 8): the model's own retrieval score routes its reading.

A reader that sees memories m = 1..M and has its question's embedding q gets, on every key of
memory m, in every layer and head, the bias

    prior_m = log_softmax_m(cos(q, e_m) / tau)

with e_m the memory's embedding (unit vectors, so the cosine is a dot product). Keys of the
reader's own tokens get nothing. One memory gives prior 0: nothing changes.

Training runs two phases (`prior_forward`): the whole row once without any bias, whose segment
tokens give every memory's embedding and the question's (segment tokens never see a reader, so
they are what a prior-free pass computes), then the row again with the priors as a per-latent-key
bias on the readers. Gradients flow through both, so the compressive loss also trains the
embeddings. The second phase recomputes the segment tokens (same values) rather than gathering
the readers out of the packed row, which costs about one more forward and backward pass.

At inference the same prior becomes one scalar per memory page of the hybrid paged attention
kernel (`grc_jax.inference.loop`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grc_jax import layout, model
from grc_jax.config import ModelConfig


def log_prior(scores: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """log_softmax of `scores` [..., M] over the last axis, over the `valid` entries only;
    invalid entries get 0 (no bias)."""
    scores = jnp.asarray(scores, jnp.float32)
    if valid is None:
        return jax.nn.log_softmax(scores, axis=-1)
    valid = jnp.asarray(valid, bool)
    lse = jax.nn.logsumexp(jnp.where(valid, scores, -jnp.inf), axis=-1, keepdims=True)
    return jnp.where(valid, scores - jnp.where(jnp.isfinite(lse), lse, 0.0), 0.0)


def memory_prior(question: jax.Array, memories: jax.Array, temperature: float) -> jax.Array:
    """The prior [..., M] of memories [..., M, E] for a question [..., E] (unit embeddings)."""
    scores = jnp.einsum("...me,...e->...m", jnp.asarray(memories, jnp.float32), jnp.asarray(question, jnp.float32))
    return log_prior(scores / temperature)


def segment_priors(embeddings: jax.Array, seg_question: jax.Array, temperature: float) -> jax.Array:
    """float32 [B, S]: each segment slot's prior among the memories of the reader that sees it.

    embeddings [B, S, E] (unit vectors, `model.pool_latents`); seg_question [B, S]: the slot of
    the question segment of the reader that sees slot s as a memory, or -1 (no prior: 0). The
    memories sharing a question segment are one reader's, so the softmax runs over them."""
    seg_question = jnp.asarray(seg_question)
    valid = seg_question >= 0
    question = jnp.take_along_axis(embeddings, jnp.maximum(seg_question, 0)[..., None], axis=1)
    scores = jnp.sum(embeddings.astype(jnp.float32) * question.astype(jnp.float32), axis=-1) / temperature
    same = (seg_question[:, :, None] == seg_question[:, None, :]) & valid[:, None, :]
    lse = jax.nn.logsumexp(jnp.where(same, scores[:, None, :], -jnp.inf), axis=-1)
    return jnp.where(valid, scores - jnp.where(valid, lse, 0.0), 0.0)


def latent_key_bias(prior: jax.Array, meta: layout.TokenMeta) -> jax.Array:
    """float32 [B, L]: each LATENT token's segment prior (segment id g is slot g - 1, as
    `layout.RowBuilder` numbers them), 0 on every other token."""
    segment, kind = jnp.asarray(meta.segment), jnp.asarray(meta.kind)
    slot = jnp.clip(segment - 1, 0, prior.shape[1] - 1)
    per_token = jnp.take_along_axis(prior, slot, axis=1)
    return jnp.where((kind == layout.LATENT) & (segment > 0), per_token, 0.0)


def prior_forward(
    config: ModelConfig,
    params: model.Params,
    tokens: jax.Array,
    meta: layout.TokenMeta,
    seg_latent_index: jax.Array,
    seg_question: jax.Array,
    temperature: float | None,
) -> tuple[model.ForwardOutput, jax.Array, jax.Array]:
    """The two-phase forward: (second phase's output, the segments' embeddings [B, S, E] from
    the first phase, the priors [B, S]). temperature None: the second phase takes no bias
    (the prior-free model, computed in two phases)."""
    first = model.forward(config, params, tokens, meta, compute_logits=False)
    embeddings = model.pool_latents(config, params, first.hidden, seg_latent_index)
    if temperature is None:
        prior = jnp.zeros(jnp.shape(seg_question), jnp.float32)
        return model.forward(config, params, tokens, meta), embeddings, prior
    prior = segment_priors(embeddings, seg_question, temperature)
    out = model.forward(config, params, tokens, meta, memory_bias=latent_key_bias(prior, meta))
    return out, embeddings, prior
