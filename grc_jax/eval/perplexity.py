"""Perplexity of the plain causal language model on natural text.

GRC tuning must leave the model a language model: its perplexity on ordinary text, read without
latents or memories (`model.forward` with meta=None), should stay near the base checkpoint's.
The text is tokenised as one stream (documents joined by a blank line) and cut into
non-overlapping windows of `window` tokens; each window is scored on its own (no context carried
over), every token but a window's first counting once. Base and tuned models scored on the same
windows compare directly.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grc_jax import model
from grc_jax.config import ModelConfig


def text_windows(
    tokenizer: Any, documents: Sequence[str], window: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Non-overlapping windows of `window` token ids over the documents joined by blank lines
    (the last, shorter window kept if it has at least two tokens); at most `max_tokens` in all."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    stream: list[int] = tokenizer.encode("\n\n".join(documents))
    if max_tokens is not None:
        stream = stream[:max_tokens]
    windows = [stream[i : i + window] for i in range(0, len(stream), window)]
    return [w for w in windows if len(w) >= 2]


@partial(jax.jit, static_argnums=0)
def _token_nll(config: ModelConfig, params: model.Params, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """Negative log-likelihood of tokens[:, 1:] given their prefixes, 0 where not valid."""
    logits = model.forward(config, params, tokens, valid=valid).logits[:, :-1, : config.vocab_size]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.where(valid[:, 1:], nll, 0.0)


def perplexity(
    config: ModelConfig, params: model.Params, windows: Sequence[Sequence[int]], batch_size: int = 4
) -> dict[str, float]:
    """exp(mean NLL) over every scored token of `windows` (see `text_windows`), with the counts.
    Windows are right-padded to the longest; padding is never scored."""
    if not windows:
        raise ValueError("no text to score: every window is shorter than 2 tokens")
    width = max(len(w) for w in windows)
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        tokens = np.zeros((batch_size, width), np.int32)  # a fixed batch shape: one compilation
        valid = np.zeros((batch_size, width), bool)
        for row, ids in enumerate(chunk):
            tokens[row, : len(ids)], valid[row, : len(ids)] = ids, True
        nll = np.asarray(_token_nll(config, params, jnp.asarray(tokens), jnp.asarray(valid)), np.float64)
        total += float(nll.sum())
        count += int(valid[:, 1:].sum())
    mean = total / count
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens_scored": count, "windows": len(windows)}
