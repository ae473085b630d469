"""The decode loop: paged forward, sampling, and one jitted `lax.while_loop` per call.

Every model call goes through `feed`: a ragged batch of new tokens (any number per row, 0
included) runs through the stacked layers in a `lax.scan`, writes its K/V into the rows' token
pages and attends, with `hybrid_paged_attention`, to the rows' memory pages and token pages.
Chunked prefill and decode are the same call with different token counts.

Buffer conventions (per row b): `tokens[b, :total[b]]` holds the prompt and what was generated;
the first `lengths[b]` of them have K/V in the token pages. Prefill feeds all but the last
prompt token; each decode step feeds the one pending token and appends the sampled one.

Positions: a row that reads memories is a READER whose tokens start at P + K (the memories'
latents sit at P .. P+K-1, docs/design.md section 3). A row without memories counts from 0, as
`model.forward(meta=None)` and transformers do; RoPE makes the two choices equal up to rounding,
and 0 keeps plain generation bit-comparable with those references.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Hashable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from grc_jax import model
from grc_jax.config import DTYPES, ModelConfig
from grc_jax.inference.pages import KVPool, OutOfPages, PageAllocator, new_pool, write_memories
from pallas_kernels.hybrid_paged_attention import hybrid_paged_attention
from pallas_kernels.hybrid_paged_attention.dispatch import default_impl

MemorySource = Callable[[Sequence[Hashable]], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; otherwise softmax(logits / temperature), cut to the top_k
    tokens and then to the smallest set of probability >= top_p (HF's order)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):  # NaN fails both
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """The static part of a decode call (one compiled program per distinct value)."""

    max_new_tokens: int
    sampling: Sampling = GREEDY
    stop_token_ids: tuple[int, ...] = ()
    page_size: int = 16
    prefill_chunk: int = 256  # new tokens per prefill call, over the whole batch
    record_logits: bool = False  # keep every step's logits (tests, scoring)
    impl: str | None = None  # hybrid_paged_attention implementation; None picks by backend

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.prefill_chunk < 1 or self.page_size < 1:
            raise ValueError("prefill_chunk and page_size must be >= 1")
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
    logits: jax.Array  # float32 [B, R, vocab]; R = max_new_tokens with record_logits, else 0
    mem_page_bias: jax.Array | None = None  # float32 [B, M]: memory priors per page entry; None: none


# --- the model over pages ---------------------------------------------------------------


def feed(config: ModelConfig, params: model.Params, state: DecodeState, n: jax.Array, capacity: int,
         impl: str | None = None, tok_width: int | None = None) -> tuple[jax.Array, jax.Array, DecodeState]:
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
    # Rows past the batch's tokens write to page L*N + l*N, out of range: the scatter drops them.
    write_page = jnp.where(valid, page, L * N)
    within = slot % S
    new_lengths = state.lengths + n
    tok_table = state.tok_page_table[:, :tok_width]

    dtype = DTYPES[config.dtype]
    x = jnp.take(params["embed"], token, axis=0).astype(dtype)[None]
    cos, sin = model.rope_cos_sin(config, pos[None])
    # All layers' pages as one [L*N, S, kv, d] pool, so a layer is a page offset and the scan
    # carries (and updates in place) one buffer instead of copying a layer slice per step.
    k_all = state.pool.k.reshape(L * N, *state.pool.k.shape[2:])
    v_all = state.pool.v.reshape(L * N, *state.pool.v.shape[2:])

    def layer(carry, xs):
        x, k_all, v_all = carry
        p, offset = xs
        q, k, v = model.attention_inputs(config, p, x, cos, sin)
        k_all = k_all.at[write_page + offset, within].set(k[0].astype(k_all.dtype), mode="drop")
        v_all = v_all.at[write_page + offset, within].set(v[0].astype(v_all.dtype), mode="drop")
        attention = hybrid_paged_attention(
            q[0], k_all, v_all, cu, state.mem_page_table + offset, state.mem_page_lens,
            tok_table + offset, new_lengths, mem_page_bias=state.mem_page_bias, impl=impl)
        return (model.layer_output(config, p, x, attention[None]), k_all, v_all), None

    carry = (x, k_all, v_all)
    if isinstance(params["layers"], tuple):  # from `unstack_layers`
        for l, p in enumerate(params["layers"]):
            carry, _ = layer(carry, (p, l * N))
    else:
        carry, _ = jax.lax.scan(layer, carry, (params["layers"], jnp.arange(L, dtype=jnp.int32) * N))
    x, k_all, v_all = carry
    pool = KVPool(k_all.reshape(state.pool.k.shape), v_all.reshape(state.pool.v.shape))
    return x[0], cu, state.replace(pool=pool, lengths=new_lengths)


def unstack_layers(params: model.Params) -> model.Params:
    """The parameters with `layers` as a tuple of per-layer dicts, which `feed` runs as an
    unrolled Python loop.

    XLA:CPU copies a layer's weights out of the stacked arrays on every step of a scan over
    them, which at batch 1 doubles the bytes a decode step moves (100M model, layers and head
    alone: 34 ms per step scanned, 20 ms unstacked; benchmarks/layer_loop_bench.py); separate
    arrays are read in place. The Decoder does this on the CPU only (`per_layer_weights`): it
    costs a second copy of the layer weights, which device memory can seldom spare, and has not
    been measured on accelerators."""
    layers = params["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(count))}


def final_hidden(config: ModelConfig, params: model.Params, x: jax.Array) -> jax.Array:
    return model.rms_norm(x, params["final_norm"], config.rms_norm_eps)


def sample_logits(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """int32 [B] from float32 logits [B, V]."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep a token while the mass before it is < top_p: the smallest set reaching top_p.
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# --- the loops --------------------------------------------------------------------------


WIDTH_STEPS, WIDTH_FLOOR = 4, 4


def table_widths(num_tok_pages: int, impl: str | None) -> tuple[int, ...]:
    """Token page-table widths the loops step through as rows grow.

    The XLA reference gathers every page-table entry of a row, used or not, so on CPU a loop
    that attends over only the pages in use so far is several times faster; it costs one
    compiled loop body per width. The Pallas kernels skip unused pages themselves: one width.
    """
    if (impl or default_impl()) != "reference":
        return (num_tok_pages,)
    return tuple(sorted({min(num_tok_pages, max(WIDTH_FLOOR, -(-num_tok_pages * i // WIDTH_STEPS)))
                         for i in range(1, WIDTH_STEPS + 1)}))


def _phased_loop(cond: Callable, body: Callable, need: Callable, state: DecodeState, impl: str | None) -> DecodeState:
    """`while cond: body(width=...)` as a sequence of while loops over growing page-table
    widths; the loop of width w runs while the next step needs at most w token pages."""
    widths = table_widths(state.tok_page_table.shape[1], impl)
    for w in widths[:-1]:
        state = jax.lax.while_loop(lambda s, w=w: cond(s) & (need(s) <= w), functools.partial(body, width=w), state)
    return jax.lax.while_loop(cond, functools.partial(body, width=widths[-1]), state)


def _prefill(config: ModelConfig, settings: DecodeSettings, params: model.Params, state: DecodeState) -> DecodeState:
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

    return _phased_loop(lambda s: jnp.any(s.total - 1 - s.lengths > 0), body, need, state, settings.impl)


def _decode(config: ModelConfig, settings: DecodeSettings, params: model.Params, state: DecodeState,
            until: jax.Array) -> DecodeState:
    """Decode steps until every row is done or `step` reaches `until`."""
    B, S = state.tokens.shape[0], state.pool.page_size
    rows = jnp.arange(B)
    stops = jnp.asarray(settings.stop_token_ids or (-1,), jnp.int32)

    def body(s: DecodeState, *, width: int) -> DecodeState:
        live = ~s.done
        x, cu, s = feed(config, params, s, live.astype(jnp.int32), B, settings.impl, width)
        last = final_hidden(config, params, x[jnp.maximum(cu[1:] - 1, 0)])
        logits = model.lm_logits(config, params, last)[:, : config.vocab_size]  # never a meta latent token
        token = sample_logits(logits, jax.random.fold_in(s.rng, s.step), settings.sampling)
        made = s.total - s.prompt_lens
        tokens = s.tokens.at[rows, jnp.where(live, s.total, s.tokens.shape[1])].set(token, mode="drop")
        recorded = s.logits
        if settings.record_logits:
            recorded = recorded.at[rows, jnp.where(live, made, recorded.shape[1])].set(logits, mode="drop")
        made = made + live
        finished = jnp.isin(token, stops) | (made >= s.budget)
        return s.replace(tokens=tokens, total=s.total + live, done=s.done | (live & finished), step=s.step + 1,
                         logits=recorded)

    def need(s: DecodeState) -> jax.Array:
        return jnp.max(jnp.where(s.done, 0, -(-(s.lengths + 1) // S)))

    return _phased_loop(lambda s: (s.step < until) & ~jnp.all(s.done), body, need, state, settings.impl)


@functools.partial(jax.jit, static_argnames=("config", "settings"), donate_argnames=("state",))
def run(config: ModelConfig, settings: DecodeSettings, params: model.Params, state: DecodeState,
        until: jax.Array) -> DecodeState:
    """Prefill (a no-op once done) then decode steps up to `until`; `state` is donated."""
    return _decode(config, settings, params, _prefill(config, settings, params, state), until)


@functools.partial(jax.jit, static_argnames=("config", "settings", "latent_ids", "eor_id"),
                   donate_argnames=("state",))
def run_reason_embed(config: ModelConfig, settings: DecodeSettings, params: model.Params, state: DecodeState,
                     latent_ids: tuple[int, ...], eor_id: int) -> tuple[DecodeState, jax.Array, jax.Array]:
    """Self-reason-latent embedding in one program: generate a reasoning trace (stopping at
    `eor_id` or the row's budget), close it with `eor_id` if it was cut, append the K meta latent
    tokens, feed them, and pool the latents' final hidden states.

    Returns the state, the embeddings [B, dim] and each row's buffer length after reasoning
    (before the appended eor and latents)."""
    state = _decode(config, settings, params, _prefill(config, settings, params, state),
                    jnp.int32(np.iinfo(np.int32).max))
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
        jnp.asarray(latent_ids, jnp.int32)[None], mode="drop")
    total = jnp.where(real, total + K, total)
    state = state.replace(tokens=tokens, total=total)
    # At most [last generated token][eor][K latents] per row are still to be fed.
    x, cu, state = feed(config, params, state, state.total - state.lengths, B * (K + 2), settings.impl)
    hidden = final_hidden(config, params, x)
    index = jnp.maximum(cu[1:, None] - K + jnp.arange(K)[None], 0)  # [B, K]
    return state, model.pool_latents(config, params, hidden[None], index[None])[0], reasoned


# --- the host side ----------------------------------------------------------------------


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two: few distinct shapes, so few compilations."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def length_bucket(n: int, minimum: int = 1) -> int:
    """Like `bucket`, with four steps per octave past 64 (1, 1.25, 1.5, 1.75 x 2^k): a long
    prompt wastes at most 25% of its page table, which the CPU reference pays for per token."""
    n = max(int(n), minimum)
    if n <= 64:
        return bucket(n, minimum)
    octave = 1 << (n.bit_length() - 1)
    return next(octave * q // 4 for q in (4, 5, 6, 7, 8) if octave * q // 4 >= n)


@dataclasses.dataclass
class Batch:
    """A running batch: its state (replace it with each call's result) and what it holds."""

    state: DecodeState
    settings: DecodeSettings
    rows: int
    requests: list[Hashable]
    memories: list[Hashable]


class Decoder:
    """A model, its page pool and allocator; runs batches of prompts through `run`.

    Not thread-safe. Memories are fetched from `memory_source(ids) -> (keys, values)`
    ([n, layers, K, kv_heads, head_dim] each) when they are not resident in the pool.
    per_layer_weights: hold the layer weights as separate per-layer arrays (`unstack_layers`);
    None means on the CPU only.
    """

    def __init__(self, config: ModelConfig, params: model.Params, *, num_pages: int = 256, page_size: int = 16,
                 prefill_chunk: int = 256, impl: str | None = None, per_layer_weights: bool | None = None):
        if per_layer_weights is None:
            per_layer_weights = jax.default_backend() == "cpu"
        self.config = config
        self.params = unstack_layers(params) if per_layer_weights else params
        self.page_size, self.prefill_chunk, self.impl = page_size, prefill_chunk, impl
        self.pool = new_pool(config, num_pages, page_size)
        self.allocator = PageAllocator(num_pages, page_size)
        self._next_request = 0

    def settings(self, max_new_tokens: int, sampling: Sampling = GREEDY, stop_token_ids: Sequence[int] = (),
                 record_logits: bool = False) -> DecodeSettings:
        return DecodeSettings(max_new_tokens=max_new_tokens, sampling=sampling, stop_token_ids=tuple(stop_token_ids),
                              page_size=self.page_size, prefill_chunk=self.prefill_chunk,
                              record_logits=record_logits, impl=self.impl)

    # public calls

    def generate(self, prompts: Sequence[Sequence[int]], settings: DecodeSettings, *,
                 memories: Sequence[Sequence[Hashable]] | None = None, memory_source: MemorySource | None = None,
                 budgets: Sequence[int] | None = None, seed: int = 0,
                 memory_bias: Sequence[Sequence[float]] | None = None) -> list[list[int]]:
        """The new tokens of every row (a stop token that ended a row included).
        memory_bias: per row, one float per memory of `memories` (memory priors, docs/design.md
        section 8), added to the row's attention logits on every key of that memory."""
        out, _ = self.generate_with_logits(prompts, settings, memories=memories, memory_source=memory_source,
                                           budgets=budgets, seed=seed, memory_bias=memory_bias)
        return out

    def generate_with_logits(self, prompts: Sequence[Sequence[int]], settings: DecodeSettings, *,
                             memories: Sequence[Sequence[Hashable]] | None = None,
                             memory_source: MemorySource | None = None, budgets: Sequence[int] | None = None,
                             seed: int = 0, memory_bias: Sequence[Sequence[float]] | None = None
                             ) -> tuple[list[list[int]], list[np.ndarray] | None]:
        """`generate`, plus each row's per-step logits [new tokens, vocab] with record_logits."""
        batch = self.start(prompts, settings, memories, memory_source, budgets, seed, memory_bias=memory_bias)
        try:
            self.advance(batch, settings.max_new_tokens)
            tokens, prompt_lens, total, logits = jax.device_get(
                (batch.state.tokens, batch.state.prompt_lens, batch.state.total, batch.state.logits))
        finally:
            self.finish(batch)
        out = [tokens[b, prompt_lens[b]:total[b]].tolist() for b in range(batch.rows)]
        if not settings.record_logits:
            return out, None
        return out, [logits[b, : len(out[b])] for b in range(batch.rows)]

    def stream(self, prompts: Sequence[Sequence[int]], settings: DecodeSettings, *, steps_per_chunk: int = 8,
               memories: Sequence[Sequence[Hashable]] | None = None, memory_source: MemorySource | None = None,
               budgets: Sequence[int] | None = None, seed: int = 0,
               memory_bias: Sequence[Sequence[float]] | None = None) -> Iterator[list[list[int]]]:
        """Yields, every `steps_per_chunk` decode steps, the tokens each row made since the last
        yield. The same compiled loop as `generate`, stopped early and resumed with its state."""
        if steps_per_chunk < 1:
            raise ValueError(f"steps_per_chunk must be >= 1, got {steps_per_chunk}")
        batch = self.start(prompts, settings, memories, memory_source, budgets, seed, memory_bias=memory_bias)
        try:
            emitted = np.asarray(jax.device_get(batch.state.prompt_lens))
            step = 0
            while True:
                step = min(step + steps_per_chunk, settings.max_new_tokens)
                self.advance(batch, step)
                tokens, total, done = jax.device_get((batch.state.tokens, batch.state.total, batch.state.done))
                yield [tokens[b, emitted[b]:total[b]].tolist() for b in range(batch.rows)]
                emitted = total
                if done[: batch.rows].all() or step >= settings.max_new_tokens:
                    return
        finally:
            self.finish(batch)

    def reason_embed(self, prompts: Sequence[Sequence[int]], *, max_reason_tokens: int, eor_id: int,
                     latent_ids: Sequence[int], budgets: Sequence[int] | None = None
                     ) -> tuple[np.ndarray, list[list[int]]]:
        """Embeddings [n, dim] after greedy self-reasoning, and each row's reasoning tokens
        (eor included when the model wrote it)."""
        settings = self.settings(max_reason_tokens, GREEDY, (eor_id,))
        K = len(latent_ids)
        batch = self.start(prompts, settings, None, None, budgets, 0, extra=K + 1)
        try:
            batch.state, emb, reasoned = run_reason_embed(
                self.config, batch.settings, self.params, batch.state,
                tuple(int(i) for i in latent_ids), int(eor_id))
            tokens, prompt_lens, reasoned, emb = jax.device_get(
                (batch.state.tokens, batch.state.prompt_lens, reasoned, emb))
        finally:
            self.finish(batch)
        reasoning = [tokens[b, prompt_lens[b]:reasoned[b]].tolist() for b in range(batch.rows)]
        return np.asarray(emb[: batch.rows]), reasoning

    def advance(self, batch: Batch, until: int) -> None:
        """Runs the batch's prefill (once) and decode steps until step `until` or all rows done."""
        batch.state = run(self.config, batch.settings, self.params, batch.state, jnp.int32(until))

    # internals

    def _jit_settings(self, settings: DecodeSettings) -> DecodeSettings:
        """Budgets carry the exact count; the compiled program only needs a bucketed bound."""
        if settings.page_size != self.page_size:
            raise ValueError(f"settings.page_size={settings.page_size} but the pool's pages hold {self.page_size}")
        bound = bucket(settings.max_new_tokens) if settings.record_logits else 0
        return dataclasses.replace(settings, max_new_tokens=bound)

    def start(self, prompts: Sequence[Sequence[int]], settings: DecodeSettings,
              memories: Sequence[Sequence[Hashable]] | None = None, memory_source: MemorySource | None = None,
              budgets: Sequence[int] | None = None, seed: int = 0, extra: int = 0,
              memory_bias: Sequence[Sequence[float]] | None = None) -> Batch:
        """Admits a batch: pages for its rows and memories (all or nothing), memories written,
        the initial state built. The state owns the pool until `finish`; `extra` reserves
        token slots past the budget (the eor and latents of self-reasoning)."""
        c, S = self.config, self.page_size
        if self.pool is None:
            raise RuntimeError("the decoder is running another batch: finish it (or close its stream) first")
        n = len(prompts)
        if n == 0:
            raise ValueError("no prompts")
        prompts = [list(map(int, p)) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; a row needs at least one token")
            bad = [t for t in p if not 0 <= t < c.total_vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {c.total_vocab_size}): {bad[:4]}")
        # A prefill call costs its capacity in query rows, used or not: no more rows than the prompts
        # need (bucketed, and at least 32 so short prompts share one compiled program).
        jit_settings = dataclasses.replace(self._jit_settings(settings), prefill_chunk=min(
            settings.prefill_chunk, bucket(sum(len(p) - 1 for p in prompts), 32)))
        if budgets is None:
            budgets = [settings.max_new_tokens] * n
        budgets = [int(b) for b in budgets]
        if len(budgets) != n or any(not 0 <= b <= settings.max_new_tokens for b in budgets):
            raise ValueError(f"budgets must be {n} values in [0, max_new_tokens={settings.max_new_tokens}], got {budgets}")
        memories = [list(m) for m in memories] if memories is not None else [[] for _ in prompts]
        if len(memories) != n:
            raise ValueError(f"{len(memories)} memory lists for {n} prompts")
        if any(memories) and memory_source is None:
            raise ValueError("memories were named but no memory_source was given")
        bias_rows = _memory_bias_rows(memory_bias, memories)

        K = c.num_latents
        wanted = list(dict.fromkeys(m for row in memories for m in row))
        ids = [self._next_request + i for i in range(n)]
        self._next_request += n
        need = {rid: len(p) + b + extra for rid, p, b in zip(ids, prompts, budgets)}
        if wanted:
            # Fetch before allocating: an unknown id or a misshapen memory must fail with the pool untouched.
            fetched = tuple(np.asarray(a) for a in memory_source(wanted))
            expected = [len(wanted), c.num_layers, K, c.num_kv_heads, c.head_dim]
            for what, array in zip(("keys", "values"), fetched):
                if list(array.shape) != expected:
                    raise ValueError(f"memory_source gave {what} of shape {list(array.shape)} for memories "
                                     f"{wanted[:8]}; this model reads [memories, layers, K, kv_heads, head_dim]="
                                     f"{expected}")
        try:
            req_pages, mem_pages, new = self.allocator.admit(need, {m: K for m in wanted},
                                                             labels={rid: f"prompt {i}" for i, rid in enumerate(ids)})
        except OutOfPages as e:
            token_pages = [self.allocator.pages_for(t) for t in need.values()]
            raise OutOfPages(f"{e}; this batch's prompts need {token_pages} token pages and its {len(wanted)} "
                             f"memories {self.allocator.pages_for(K)} each") from None
        # From here to the state, any failure (a memory write, a bad seed, an interrupt) gives the
        # batch's pages back: a page kept by a failed start would be lost for good.
        try:
            return self._start_admitted(prompts, settings, jit_settings, memories, budgets, seed, extra, fetched
                                        if wanted else None, ids, wanted, req_pages, mem_pages, new, bias_rows)
        except BaseException:
            if self.pool is not None and (self.pool.k.is_deleted() or self.pool.v.is_deleted()):
                # consumed by a failed write: start over with an empty pool
                self.pool = new_pool(c, self.allocator.num_pages, S)
                self.allocator = PageAllocator(self.allocator.num_pages, S)
            else:
                self.allocator.release(ids, wanted)
                for m in new:
                    self.allocator.evict_memory(m)
            raise

    def _start_admitted(self, prompts: list[list[int]], settings: DecodeSettings, jit_settings: DecodeSettings,
                        memories: list[list[Hashable]], budgets: list[int], seed: int, extra: int,
                        fetched: tuple[np.ndarray, np.ndarray] | None, ids: list[int], wanted: list[Hashable],
                        req_pages: dict, mem_pages: dict, new: list[Hashable],
                        bias_rows: list[list[float]] | None = None) -> Batch:
        """`start` after the pages are admitted: the memories written, the state built."""
        c, S, n = self.config, self.page_size, len(prompts)
        K = c.num_latents
        if new:
            keys, values = fetched
            order = [wanted.index(m) for m in new]
            self.pool = write_memories(self.pool, [mem_pages[m] for m in new], np.asarray(keys)[order],
                                       np.asarray(values)[order])
        rng = jax.random.key(seed)
        B = bucket(n)
        W = length_bucket(max(len(p) + b + extra for p, b in zip(prompts, budgets)), S)
        T = -(-W // S)
        pages_per_mem = -(-K // S)
        most = max(len(m) for m in memories) * pages_per_mem
        # No memory at all: an empty memory table, so the reference gathers no memory page.
        M = bucket(most) if most or (self.impl or default_impl()) != "reference" else 0
        tokens = np.zeros((B, W), np.int32)
        tok_table = np.zeros((B, T), np.int32)
        mem_table = np.zeros((B, M), np.int32)
        mem_lens = np.zeros((B, M), np.int32)
        prompt_lens = np.zeros(B, np.int32)
        offset = np.zeros(B, np.int32)
        budget = np.zeros(B, np.int32)
        slot_lens = [min(S, K - j * S) for j in range(pages_per_mem)]
        for b, (p, rid) in enumerate(zip(prompts, ids)):
            tokens[b, : len(p)] = p
            prompt_lens[b], budget[b] = len(p), budgets[b]
            pages = req_pages[rid]
            tok_table[b, : len(pages)] = pages
            row_pages = [pg for m in memories[b] for pg in mem_pages[m]]
            mem_table[b, : len(row_pages)] = row_pages
            mem_lens[b, : len(row_pages)] = slot_lens * len(memories[b])
            offset[b] = c.max_segment_len + K if memories[b] else 0
        record = bucket(settings.max_new_tokens) if settings.record_logits else 0
        mem_bias = None
        if bias_rows is not None:  # each memory's value on each of its page entries
            mem_bias = np.zeros((B, M), np.float32)
            for b, row in enumerate(bias_rows):
                per_page = np.repeat(np.asarray(row, np.float32), pages_per_mem)
                mem_bias[b, : len(per_page)] = per_page
            mem_bias = jnp.asarray(mem_bias)
        state = DecodeState(
            tokens=jnp.asarray(tokens), pool=self.pool, mem_page_table=jnp.asarray(mem_table),
            mem_page_lens=jnp.asarray(mem_lens), tok_page_table=jnp.asarray(tok_table),
            lengths=jnp.zeros(B, jnp.int32), total=jnp.asarray(prompt_lens), prompt_lens=jnp.asarray(prompt_lens),
            pos_offset=jnp.asarray(offset), budget=jnp.asarray(budget), done=jnp.asarray(budget <= 0),
            step=jnp.zeros((), jnp.int32), rng=rng,
            logits=jnp.zeros((B, record, c.vocab_size), jnp.float32), mem_page_bias=mem_bias)
        self.pool = None  # the state owns it until _finish hands it back
        return Batch(state, jit_settings, n, ids, wanted)

    def finish(self, batch: Batch) -> None:
        """Takes the pool back from the batch's (last) state and frees the batch's pages."""
        pool = batch.state.pool
        if pool.k.is_deleted() or pool.v.is_deleted():
            # The call that consumed the pool failed: its pages' contents are gone.
            self.pool = new_pool(self.config, self.allocator.num_pages, self.page_size)
            self.allocator = PageAllocator(self.allocator.num_pages, self.page_size)
            return
        self.pool = pool
        self.allocator.release(batch.requests, batch.memories)


def _memory_bias_rows(memory_bias: Sequence[Sequence[float]] | None,
                      memories: list[list[Hashable]]) -> list[list[float]] | None:
    """Checks a per-row, per-memory bias against the rows' memories (before anything is allocated)."""
    if memory_bias is None:
        return None
    rows = [[float(x) for x in row] for row in memory_bias]
    if len(rows) != len(memories) or any(len(r) != len(m) for r, m in zip(rows, memories)):
        raise ValueError(f"memory_bias must give one value per memory of each row: memories per row "
                         f"{[len(m) for m in memories]}, bias values per row {[len(r) for r in rows]}")
    if not all(np.isfinite(r).all() for r in rows):
        raise ValueError("memory_bias values must be finite")
    return rows
