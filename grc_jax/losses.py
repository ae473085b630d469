"""The three GRC objectives from one forward pass (docs/design.md section 4)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from grc_jax import layout, model, priors
from grc_jax.config import ModelConfig

QUERY, DOCUMENT = 1, 2


def token_cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, normalizer: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(weighted next-token CE over `normalizer`, by default the weight sum: the weighted mean;
    weight sum). logits [..., V] float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    total = weights.sum()
    return (nll * weights).sum() / jnp.maximum(total if normalizer is None else normalizer, 1.0), total


def contrastive_loss(
    embeddings: jax.Array, seg_kind: jax.Array, seg_positive: jax.Array, seg_doc_id: jax.Array, temperature: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """InfoNCE of every query against every document of the batch it is given.

    embeddings [B, S, E] (unit vectors); under jit with a sharded global batch this is the
    whole global batch, every device and host. A copy of a query's positive elsewhere in the
    batch is not counted as a negative.
    """
    b, s, _ = embeddings.shape
    flat = embeddings.reshape(b * s, -1)
    kind = seg_kind.reshape(-1)
    doc_id = seg_doc_id.reshape(-1)
    positive = (jnp.arange(b)[:, None] * s + seg_positive).reshape(-1)
    is_query = (kind == QUERY) & (seg_positive.reshape(-1) >= 0)
    positive = jnp.where(is_query, positive, 0)
    scores = (flat @ flat.T) / temperature
    slots = jnp.arange(b * s)
    duplicate = (doc_id[None, :] == doc_id[positive][:, None]) & (slots[None, :] != positive[:, None])
    candidate = (kind == DOCUMENT)[None, :] & ~duplicate
    scores = jnp.where(candidate, scores, -jnp.inf)
    positive_score = jnp.take_along_axis(scores, positive[:, None], axis=1)[:, 0]
    per_query = jax.nn.logsumexp(jnp.where(is_query[:, None], scores, 0.0), axis=1) - jnp.where(
        is_query, positive_score, 0.0
    )
    count = is_query.sum()
    loss = jnp.where(is_query, per_query, 0.0).sum() / jnp.maximum(count, 1)
    hit = (jnp.argmax(scores, axis=1) == positive) & is_query
    return loss, {"rep_accuracy": hit.sum() / jnp.maximum(count, 1), "rep_queries": count}


def grc_loss(
    config: ModelConfig,
    params: model.Params,
    batch: dict[str, jax.Array],
    weights: dict[str, float],
    temperature: float,
    token_totals: dict[str, jax.Array] | None = None,
    prior_temperature: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """λ_gen·L_gen + λ_rep·L_rep + λ_comp·L_comp over one batch of packed rows.

    With `token_totals` ({"gen": ..., "comp": ...}, a larger batch's weight sums) L_gen and L_comp
    are this batch's share of that batch's means, so micro-batches' losses add up to it.
    prior_temperature: memory priors (`grc_jax.priors`, needs batch["seg_question"]): the
    two-phase forward, the representative loss on the first phase's embeddings."""
    meta = layout.TokenMeta(batch["example"], batch["segment"], batch["kind"])
    if prior_temperature is None:
        out = model.forward(config, params, batch["tokens"], meta)
        embeddings = None
    else:
        out, embeddings, _ = priors.prior_forward(
            config, params, batch["tokens"], meta, batch["seg_latent_index"], batch["seg_question"], prior_temperature
        )
    totals = token_totals or {}
    gen, gen_tokens = token_cross_entropy(out.logits, batch["targets"], batch["gen_weight"], totals.get("gen"))
    comp, comp_tokens = token_cross_entropy(out.logits, batch["targets"], batch["comp_weight"], totals.get("comp"))
    if embeddings is None:
        embeddings = model.pool_latents(config, params, out.hidden, batch["seg_latent_index"])
    rep, rep_metrics = contrastive_loss(
        embeddings, batch["seg_kind"], batch["seg_positive"], batch["seg_doc_id"], temperature
    )
    total = weights["gen"] * gen + weights["rep"] * rep + weights["comp"] * comp
    metrics: dict[str, Any] = {
        "loss": total,
        "loss_gen": gen,
        "loss_rep": rep,
        "loss_comp": comp,
        "gen_tokens": gen_tokens,
        "comp_tokens": comp_tokens,
        **rep_metrics,
    }
    return total, metrics
