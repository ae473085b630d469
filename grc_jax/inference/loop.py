"""The jitted decode loop: its static settings, its typed state, the paged forward and the loops.

Every model call goes through `feed`: a ragged batch of new tokens (any number per row, 0
included) runs through the layers (`model.run_layers`, with an attention that writes its K/V
into the rows' token pages and attends, with `hybrid_paged_attention`, to the rows' memory pages
and token pages). Chunked prefill and decode are the same call with different token counts.
What only pays off on one attention implementation is in `grc_jax.inference.strategy`.

Buffer conventions (per row b): `tokens[b, :total[b]]` holds the prompt and what was generated;
the first `lengths[b]` of them have K/V in the token pages. Prefill feeds all but the last
prompt token; each decode step feeds the one pending token and appends the sampled one.

Positions: a row that reads memories is a READER whose tokens start at P + K (the memories'
latents sit at P .. P+K-1, docs/design.md section 3). A row without memories counts from 0, as
`model.forward(meta=None)` and transformers do; RoPE makes the two choices equal up to rounding,
and 0 keeps plain generation bit-comparable with those references.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from grc_jax import model
from grc_jax.config import ModelConfig
from grc_jax.inference import strategy
from grc_jax.inference.pages import KVPool
from grc_jax.inference.sampling import GREEDY, Sampling, sample_logits
from pallas_kernels.hybrid_paged_attention import hybrid_paged_attention


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """The static part of a compiled loop: one program per distinct value. How many tokens a row
    may make is not here but in the state (`budget`, per row), so a new limit compiles nothing."""

    sampling: Sampling = GREEDY
    stop_token_ids: tuple[int, ...] = ()
    prefill_chunk: int = 256  # new tokens per prefill call, over the whole batch
    record_logits: bool = False  # keep every step's logits in the state (tests, scoring)
    impl: str | None = None  # hybrid_paged_attention implementation; None picks by backend

    def __post_init__(self):
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@flax.struct.dataclass
class DecodeState:
    """Everything the loop carries; every array is donated to and returned by each call."""

    tokens: jax.Array  # int32 [B, W]
    pool: KVPool
    mem_page_table: jax.Array  # int32 [B, M]
    mem_page_lens: jax.Array  # int32 [B, M]; 0 = unused entry
    tok_page_table: jax.Array  # int32 [B, T]
    lengths: jax.Array  # int32 [B]: tokens with K/V in the token pages
    total: jax.Array  # int32 [B]: tokens in the buffer
    prompt_lens: jax.Array  # int32 [B]; 0 = a padding row
    pos_offset: jax.Array  # int32 [B]: position of token 0
    budget: jax.Array  # int32 [B]: new tokens this row may make
    done: jax.Array  # bool [B]
    step: jax.Array  # int32 []: decode steps run
    rng: jax.Array  # key
    logits: jax.Array  # float32 [B, R, vocab]: step r's logits at [:, r]; R = 0 without record_logits
    mem_page_bias: jax.Array | None = None  # float32 [B, M]: memory priors per page entry; None: none


# --- the model over pages ---------------------------------------------------------------


def feed(
    config: ModelConfig,
    params: model.Params,
    state: DecodeState,
    n: jax.Array,
    capacity: int,
    impl: str | None = None,
    tok_width: int | None = None,
) -> tuple[jax.Array, jax.Array, DecodeState]:
    """Runs tokens[b, lengths[b] : lengths[b] + n[b]] of every row through the model.

    The new tokens are packed into `capacity` query rows (sum(n) <= capacity). Returns the
    last layer's output (before the final norm) [capacity, hidden], cu_q_lens [B + 1] (row b's
    tokens are rows cu[b]:cu[b+1]) and the state with the K/V written and lengths advanced.
    tok_width: attend over the first tok_width token pages only (every row must fit in them).
    """
    B, W = state.tokens.shape
    L, N, S = config.num_layers, state.pool.num_pages, state.pool.page_size
    n = n.astype(jnp.int32)
    cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(n, dtype=jnp.int32)])
    r = jnp.arange(capacity, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cu[1:], r, side="right"), B - 1).astype(jnp.int32)
    valid = r < cu[-1]
    slot = jnp.where(valid, state.lengths[seq] + r - cu[seq], 0)
    token = state.tokens[seq, jnp.minimum(slot, W - 1)]
    pos = state.pos_offset[seq] + slot
    page = state.tok_page_table[seq, jnp.minimum(slot // S, state.tok_page_table.shape[1] - 1)]
    # Rows past the batch's tokens write to page L*N + layer*N, out of range: the scatter drops them.
    write_page = jnp.where(valid, page, L * N)
    within = slot % S
    new_lengths = state.lengths + n
    tok_table = state.tok_page_table[:, :tok_width]

    def paged(
        layer: Any, q: jax.Array, k: jax.Array, v: jax.Array, pool: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array], None]:
        k_all, v_all = pool
        offset = layer * N  # the layer's first page in the [L*N, ...] pool
        k_all = k_all.at[write_page + offset, within].set(k[0].astype(k_all.dtype), mode="drop")
        v_all = v_all.at[write_page + offset, within].set(v[0].astype(v_all.dtype), mode="drop")
        attention = hybrid_paged_attention(
            q[0],
            k_all,
            v_all,
            cu,
            state.mem_page_table + offset,
            state.mem_page_lens,
            tok_table + offset,
            new_lengths,
            mem_page_bias=state.mem_page_bias,
            impl=impl,
        )
        return attention[None], (k_all, v_all), None

    x = model.embed_tokens(config, params, token[None])
    cos, sin = model.rope_cos_sin(config, pos[None])
    # All layers' pages as one [L*N, S, kv, d] pool, so a layer is a page offset and the loop
    # carries (and updates in place) one buffer instead of copying a layer slice per step.
    pool = (state.pool.k.reshape(L * N, *state.pool.k.shape[2:]), state.pool.v.reshape(L * N, *state.pool.v.shape[2:]))
    x, (k_all, v_all), _ = model.run_layers(config, params["layers"], x, cos, sin, paged, pool)
    pool = KVPool(k_all.reshape(state.pool.k.shape), v_all.reshape(state.pool.v.shape))
    return x[0], cu, state.replace(pool=pool, lengths=new_lengths)


def final_hidden(config: ModelConfig, params: model.Params, x: jax.Array) -> jax.Array:
    return model.rms_norm(x, params["final_norm"], config.rms_norm_eps)


def next_token_logits(config: ModelConfig, params: model.Params, x: jax.Array, cu: jax.Array) -> jax.Array:
    """float32 [B, vocab]: each row's logits after its last fed token (never a meta latent token)."""
    last = final_hidden(config, params, x[jnp.maximum(cu[1:] - 1, 0)])
    return model.lm_logits(config, params, last)[:, : config.vocab_size]


# How often each jitted loop was traced in this process (tests check that a warm compilation
# cache makes a fresh process trace none).
TRACES: collections.Counter = collections.Counter()


# --- the loops --------------------------------------------------------------------------


def prefill(config: ModelConfig, settings: LoopSettings, params: model.Params, state: DecodeState) -> DecodeState:
    """Feeds every row's prompt but its last token, `prefill_chunk` tokens per call."""
    chunk, S = settings.prefill_chunk, state.pool.page_size

    def next_chunk(s: DecodeState) -> jax.Array:
        left = jnp.maximum(s.total - 1 - s.lengths, 0)
        before = jnp.cumsum(left) - left
        return jnp.clip(chunk - before, 0, left)  # first come, first served within the chunk

    def body(s: DecodeState, *, width: int) -> DecodeState:
        return feed(config, params, s, next_chunk(s), chunk, settings.impl, width)[2]

    def need(s: DecodeState) -> jax.Array:
        return jnp.max(-(-(s.lengths + next_chunk(s)) // S))

    return strategy.while_loop(
        lambda s: jnp.any(s.total - 1 - s.lengths > 0), body, need, state, state.tok_page_table.shape[1], settings.impl
    )


def decode_steps(
    config: ModelConfig, settings: LoopSettings, params: model.Params, state: DecodeState, until: jax.Array
) -> DecodeState:
    """Decode steps until every row is done or `step` reaches `until`."""
    B, S = state.tokens.shape[0], state.pool.page_size
    rows = jnp.arange(B)
    stops = jnp.asarray(settings.stop_token_ids or (-1,), jnp.int32)

    def body(s: DecodeState, *, width: int) -> DecodeState:
        live = ~s.done
        x, cu, s = feed(config, params, s, live.astype(jnp.int32), B, settings.impl, width)
        logits = next_token_logits(config, params, x, cu)
        token = sample_logits(logits, jax.random.fold_in(s.rng, s.step), settings.sampling)
        made = s.total - s.prompt_lens
        tokens = s.tokens.at[rows, jnp.where(live, s.total, s.tokens.shape[1])].set(token, mode="drop")
        recorded = s.logits
        if settings.record_logits:
            recorded = recorded.at[rows, jnp.where(live, made, recorded.shape[1])].set(logits, mode="drop")
        made = made + live
        finished = jnp.isin(token, stops) | (made >= s.budget)
        return s.replace(
            tokens=tokens, total=s.total + live, done=s.done | (live & finished), step=s.step + 1, logits=recorded
        )

    def need(s: DecodeState) -> jax.Array:
        return jnp.max(jnp.where(s.done, 0, -(-(s.lengths + 1) // S)))

    return strategy.while_loop(
        lambda s: (s.step < until) & ~jnp.all(s.done), body, need, state, state.tok_page_table.shape[1], settings.impl
    )


@functools.partial(jax.jit, static_argnames=("config", "settings"), donate_argnames=("state",))
def run(
    config: ModelConfig, settings: LoopSettings, params: model.Params, state: DecodeState, until: jax.Array
) -> DecodeState:
    """Prefill (a no-op once done) then decode steps up to `until`; `state` is donated."""
    TRACES["run"] += 1
    return decode_steps(config, settings, params, prefill(config, settings, params, state), until)


@functools.partial(jax.jit, static_argnames=("config", "settings", "latent_ids", "eor_id"), donate_argnames=("state",))
def run_reason_embed(
    config: ModelConfig,
    settings: LoopSettings,
    params: model.Params,
    state: DecodeState,
    latent_ids: tuple[int, ...],
    eor_id: int,
) -> tuple[DecodeState, jax.Array, jax.Array]:
    """Self-reason-latent embedding in one program: generate a reasoning trace (stopping at
    `eor_id` or the row's budget), close it with `eor_id` if it was cut, append the K meta latent
    tokens, feed them, and pool the latents' final hidden states.

    Returns the state, the embeddings [B, dim] and each row's buffer length after reasoning
    (before the appended eor and latents)."""
    state = decode_steps(
        config, settings, params, prefill(config, settings, params, state), jnp.int32(np.iinfo(np.int32).max)
    )
    B, W = state.tokens.shape
    K = len(latent_ids)
    rows = jnp.arange(B)
    real = state.prompt_lens > 0
    last = state.tokens[rows, jnp.maximum(state.total - 1, 0)]
    reasoned = state.total
    add_eor = real & (last != eor_id)
    tokens = state.tokens.at[rows, jnp.where(add_eor, state.total, W)].set(eor_id, mode="drop")
    total = state.total + add_eor
    cols = total[:, None] + jnp.arange(K)[None]
    tokens = tokens.at[rows[:, None], jnp.where(real[:, None], cols, W)].set(
        jnp.asarray(latent_ids, jnp.int32)[None], mode="drop"
    )
    total = jnp.where(real, total + K, total)
    state = state.replace(tokens=tokens, total=total)
    # At most [last generated token][eor][K latents] per row are still to be fed.
    x, cu, state = feed(config, params, state, state.total - state.lengths, B * (K + 2), settings.impl)
    hidden = final_hidden(config, params, x)
    index = jnp.maximum(cu[1:, None] - K + jnp.arange(K)[None], 0)  # [B, K]
    return state, model.pool_latents(config, params, hidden[None], index[None])[0], reasoned
