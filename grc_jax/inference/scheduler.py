"""Continuous batching: a fixed set of decode slots that requests join and leave between chunks.

`Decoder` runs one static batch per call. A server needs more: requests arrive while others
decode. `SlotBatch` keeps one `DecodeState` of `slots` rows alive for the life of the server
and runs the jitted loop `steps_per_chunk` decode steps at a time (`decode_slots`). Between two
chunks the host
- hands every running request the tokens its row made (streaming costs nothing extra);
- frees the pages of rows that finished (a stop token, the budget, or the caller said stop), and
- admits waiting requests into free slots: their token pages and memory pages come from the
  shared `PageAllocator` (a memory already resident is shared, its pages reference-counted), new
  memories are written into the pool, and `prefill_slots` feeds their prompts (its capacity
  bucketed to the prompt tokens waiting, as `Decoder.start` does: a prefill call costs its
  capacity in query rows, used or not) before the next chunk decodes.
A request whose pages are not free waits, in arrival order, until rows finish.

A row may read its memories under memory priors (docs/design.md section 8): the request's
`memory_bias`, one log-prior per memory, goes on each of that memory's page entries, as
`Decoder.start` lays it out; rows without one get 0 there (no bias).

Every row samples with its own temperature, top-k, top-p and seed (the compiled program is the
same for all of them), and row b's n-th new token uses the key fold_in(key(seed_b), n): a
request's tokens do not depend on which other requests share its chunk.

The shapes are fixed (slots, the longest row `max_len`, memories per row), so the program
compiles once. Not thread-safe: one engine thread owns it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from grc_jax import model
from grc_jax.config import ModelConfig
from grc_jax.inference import strategy
from grc_jax.inference.decoder import Decoder, bucket
from grc_jax.inference.loop import DecodeState, LoopSettings, feed, final_hidden, prefill
from grc_jax.inference.pages import OutOfPages, write_memories
from pallas_kernels.hybrid_paged_attention.dispatch import default_impl

MemorySource = Callable[[Sequence[Hashable]], tuple[np.ndarray, np.ndarray]]


@flax.struct.dataclass
class SlotState:
    """A DecodeState and each row's sampling settings ([slots] each)."""

    inner: DecodeState
    temperature: jax.Array  # float32; 0 = greedy
    top_p: jax.Array  # float32; 1 = off
    top_k: jax.Array  # int32; 0 = off
    seed: jax.Array  # uint32


def sample_rows(
    logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array
) -> jax.Array:
    """int32 [B]: row b greedy when temperature[b] == 0, else sampled from softmax(logits /
    temperature) cut to the top_k tokens and then to the smallest set of mass >= top_p (the
    order of `sampling.sample_logits`)."""
    V = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled_rows = temperature > 0
    scaled = logits / jnp.where(sampled_rows, temperature, 1.0)[:, None]

    def cut(scaled: jax.Array) -> jax.Array:
        ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
        ordered = jnp.where(jnp.arange(V)[None] < k[:, None], ordered, -jnp.inf)
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(scaled < threshold, -jnp.inf, scaled)

    # The sort costs a vocabulary-sized pass per row: only when a sampled row cuts.
    needs_cut = jnp.any(sampled_rows & ((top_p < 1.0) | (top_k > 0)))
    scaled = jax.lax.cond(needs_cut, cut, lambda x: x, scaled)
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(sampled_rows, sampled, greedy)


@functools.partial(jax.jit, static_argnames=("config", "settings"), donate_argnames=("state",))
def prefill_slots(config: ModelConfig, settings: LoopSettings, params: model.Params, state: SlotState) -> SlotState:
    """Feeds every row's prompt tokens that have no K/V yet but the last, `settings.prefill_chunk`
    tokens per call (`loop.prefill`); `state` is donated."""
    return state.replace(inner=prefill(config, settings, params, state.inner))


@functools.partial(jax.jit, static_argnames=("config", "settings"), donate_argnames=("state",))
def decode_slots(
    config: ModelConfig, settings: LoopSettings, params: model.Params, state: SlotState, until: jax.Array
) -> SlotState:
    """Decode steps until every row is done or `step` reaches `until`; `state` is donated.
    Rows must be prefilled (`prefill_slots`)."""
    inner = state.inner
    B, W = inner.tokens.shape
    S = inner.pool.page_size
    rows = jnp.arange(B)
    stops = jnp.asarray(settings.stop_token_ids or (-1,), jnp.int32)
    base_keys = jax.vmap(jax.random.key)(state.seed)

    def body(s: DecodeState, *, width: int) -> DecodeState:
        live = ~s.done
        x, cu, s = feed(config, params, s, live.astype(jnp.int32), B, settings.impl, width)
        last = final_hidden(config, params, x[jnp.maximum(cu[1:] - 1, 0)])
        logits = model.lm_logits(config, params, last)[:, : config.vocab_size]  # never a meta latent token
        made = s.total - s.prompt_lens
        keys = jax.vmap(jax.random.fold_in)(base_keys, made)
        token = sample_rows(logits, keys, state.temperature, state.top_p, state.top_k)
        tokens = s.tokens.at[rows, jnp.where(live, s.total, W)].set(token, mode="drop")
        made = made + live
        finished = jnp.isin(token, stops) | (made >= s.budget)
        return s.replace(tokens=tokens, total=s.total + live, done=s.done | (live & finished), step=s.step + 1)

    def need(s: DecodeState) -> jax.Array:
        return jnp.max(jnp.where(s.done, 0, -(-(s.lengths + 1) // S)))

    cond = lambda s: (s.step < until) & ~jnp.all(s.done)
    inner = strategy.while_loop(cond, body, need, inner, inner.tok_page_table.shape[1], settings.impl)
    return state.replace(inner=inner)


@functools.partial(jax.jit, static_argnames=("layout",))
def _unpack_rows(packed: jax.Array, layout: tuple[tuple[str, tuple[int, ...], str], ...]) -> dict[str, jax.Array]:
    """The fields `SlotBatch._upload` packed into int32 [B, sum of widths], by (name, trailing
    shape, dtype name)."""
    out, start = {}, 0
    for name, shape, dtype in layout:
        width = int(np.prod(shape, dtype=np.int64))
        part = packed[:, start : start + width].reshape(packed.shape[0], *shape)
        start += width
        if dtype == "bool":
            out[name] = part != 0
        elif dtype == "int32":
            out[name] = part
        else:
            out[name] = jax.lax.bitcast_convert_type(part, jnp.dtype(dtype))
    return out


@dataclasses.dataclass
class SlotRequest:
    """One generation request. `on_tokens(new_tokens, finished)` is called from the engine
    thread after every chunk the request ran in; returning True stops the row there (a stop
    string was found, or the client left)."""

    prompt: list[int]
    max_tokens: int
    on_tokens: Callable[[list[int], bool], bool]
    memories: list[Hashable] = dataclasses.field(default_factory=list)
    memory_bias: list[float] | None = None  # one log-prior per entry of `memories`; None: none
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    # set by the batch
    slot: int | None = None
    made: int = 0
    error: BaseException | None = None  # why the batch ended it without running it


class RequestTooLarge(ValueError):
    """A request that can never run: longer than a row, or more pages than the pool has."""


@dataclasses.dataclass
class _Row:
    request: SlotRequest
    rid: int
    emitted: int  # buffer position up to which tokens were handed out


class SlotBatch:
    """`slots` decode rows over a Decoder's pool and allocator (taken from it while this runs;
    `lend_pool` hands it back for calls such as `Decoder.reason_embed`)."""

    def __init__(
        self,
        decoder: Decoder,
        *,
        slots: int = 16,
        max_len: int = 1024,
        max_memories: int = 16,
        steps_per_chunk: int = 8,
        stop_token_ids: Sequence[int] = (),
        memory_source: MemorySource | None = None,
    ):
        if slots < 1 or max_len < 2 or max_memories < 0 or steps_per_chunk < 1:
            raise ValueError(
                f"slots, max_len, max_memories, steps_per_chunk must be >= 1, 2, 0, 1; got "
                f"{slots}, {max_len}, {max_memories}, {steps_per_chunk}"
            )
        self.decoder, self.config = decoder, decoder.config
        S = decoder.page_size
        self.slots, self.max_memories, self.steps_per_chunk = slots, max_memories, steps_per_chunk
        self.max_len = -(-max_len // S) * S
        self.memory_source = memory_source
        K = self.config.num_latents
        self.pages_per_memory = -(-K // S)
        self.settings = LoopSettings(
            stop_token_ids=tuple(stop_token_ids), prefill_chunk=decoder.prefill_chunk, impl=decoder.impl
        )
        self._prefill_by_capacity: dict[int, LoopSettings] = {}
        M = max(1, max_memories * self.pages_per_memory)
        if (decoder.impl or default_impl()) != "reference":
            M = bucket(M)
        self._shapes = (slots, self.max_len, self.max_len // S, M)
        self.rows: list[_Row | None] = [None] * slots
        self._row_memories: dict[int, list] = {}
        self._step = 0  # the state's `step` (kept here so reading it costs no device round trip)
        self._unfed = 0  # prompt tokens admitted and not yet prefilled
        self.waiting: list[SlotRequest] = []
        self._next_rid = 0
        if decoder.pool is None:
            raise RuntimeError("the decoder is running another batch")
        self.state = self._empty_state(decoder.pool)
        decoder.pool = None
        # The rows' host-side arrays: changed here (admissions, frees), uploaded once per chunk;
        # the device's changes to tokens, lengths, total, done come back with each chunk's tokens.
        self._host = {k: np.array(v) for k, v in jax.device_get(self._row_fields(self.state)).items()}
        self._dirty = False
        self._layout: tuple | None = None  # of the packed upload (`_upload`)

    # --- what callers use ------------------------------------------------------------------

    def check(self, request: SlotRequest) -> None:
        """Raises RequestTooLarge naming the limit when `request` could never be admitted."""
        S = self.decoder.page_size
        if len(request.prompt) + request.max_tokens > self.max_len:
            raise RequestTooLarge(
                f"the prompt ({len(request.prompt)} tokens) and max_tokens ({request.max_tokens}) "
                f"come to {len(request.prompt) + request.max_tokens} tokens; this server's rows "
                f"hold at most {self.max_len}"
            )
        if len(request.memories) > self.max_memories:
            raise RequestTooLarge(
                f"{len(request.memories)} memories; this server reads at most {self.max_memories} per request"
            )
        if request.memory_bias is not None:
            if len(request.memory_bias) != len(request.memories):
                raise ValueError(
                    f"memory_bias has {len(request.memory_bias)} values for {len(request.memories)} memories"
                )
            if not np.isfinite(np.asarray(request.memory_bias, np.float64)).all():
                raise ValueError("memory_bias values must be finite")
        pages = -(-(len(request.prompt) + request.max_tokens) // S) + len(request.memories) * self.pages_per_memory
        if pages > self.decoder.allocator.num_pages:
            raise RequestTooLarge(
                f"the request needs {pages} KV pages of {S} tokens; the pool has {self.decoder.allocator.num_pages}"
            )

    def submit(self, request: SlotRequest) -> None:
        self.check(request)
        self.waiting.append(request)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    def step(self) -> None:
        """Admits what fits, runs one chunk, hands out tokens and frees finished rows."""
        self._admit()
        if not self.running:
            return
        if self._dirty:
            self._upload()
        try:
            if self._unfed:
                self.state = prefill_slots(
                    self.config, self._prefill_settings(self._unfed), self.decoder.params, self.state
                )
                self._unfed = 0
            # a NumPy scalar: a jax.numpy one would cost a dispatch of its own every chunk
            self.state = decode_slots(
                self.config, self.settings, self.decoder.params, self.state, np.int32(self._step + self.steps_per_chunk)
            )
        except BaseException:
            self._reset_after_failure()
            raise
        inner = self.state.inner
        tokens, total, done, lengths, step = jax.device_get(
            (inner.tokens, inner.total, inner.done, inner.lengths, inner.step)
        )
        self._step = int(step)
        h = self._host
        h["tokens"], h["total"], h["done"], h["lengths"] = (np.array(a) for a in (tokens, total, done, lengths))
        stopped = []
        for b, row in enumerate(self.rows):
            if row is None:
                continue
            new = tokens[b, row.emitted : total[b]].tolist()
            row.emitted = int(total[b])
            row.request.made += len(new)
            finished = bool(done[b])
            try:
                stop = row.request.on_tokens(new, finished)
            except Exception:  # a broken callback ends its own request only
                stop = True
            if finished or stop:
                stopped.append(b)
        if stopped:
            self._free(stopped)

    def cancel_all(self, error: BaseException) -> None:
        """Ends every running and waiting request (their callbacks see `finished`)."""
        for row in self.rows:
            if row is not None:
                row.request.error = error
                row.request.on_tokens([], True)
        self._free([b for b, r in enumerate(self.rows) if r is not None])
        for request in self.waiting:
            request.error = error
            request.on_tokens([], True)
        self.waiting.clear()

    def lend_pool(self) -> _Lend:
        """`with batch.lend_pool():` the decoder holds the pool (and the pages of running rows
        stay allocated) so that Decoder.start/finish calls work; then it comes back."""
        return _Lend(self)

    @property
    def pages_in_use(self) -> int:
        return self.decoder.allocator.num_pages - self.decoder.allocator.num_free

    # --- internals -------------------------------------------------------------------------

    def _prefill_settings(self, unfed: int) -> LoopSettings:
        """The settings of a prefill call for `unfed` prompt tokens: its capacity bucketed to them
        (a call costs its capacity in query rows, used or not). Made once per capacity, not per chunk."""
        capacity = min(self.settings.prefill_chunk, bucket(unfed, 32))
        settings = self._prefill_by_capacity.get(capacity)
        if settings is None:
            settings = self._prefill_by_capacity[capacity] = dataclasses.replace(self.settings, prefill_chunk=capacity)
        return settings

    def _empty_state(self, pool) -> SlotState:
        B, W, T, M = self._shapes
        zeros = lambda shape, dtype=jnp.int32: jnp.zeros(shape, dtype)
        inner = DecodeState(
            tokens=zeros((B, W)),
            pool=pool,
            mem_page_table=zeros((B, M)),
            mem_page_lens=zeros((B, M)),
            tok_page_table=zeros((B, T)),
            lengths=zeros(B),
            total=zeros(B),
            prompt_lens=zeros(B),
            pos_offset=zeros(B),
            budget=zeros(B),
            done=jnp.ones(B, bool),
            step=zeros(()),
            rng=jax.random.key(0),
            logits=zeros((B, 0, self.config.vocab_size), jnp.float32),
            mem_page_bias=zeros((B, M), jnp.float32),
        )
        return SlotState(inner, zeros(B, jnp.float32), jnp.ones(B, jnp.float32), zeros(B), zeros(B, jnp.uint32))

    def _admit(self) -> None:
        free = [b for b, r in enumerate(self.rows) if r is None]
        if not self.waiting or not free:
            return
        K, P, S = self.config.num_latents, self.config.max_segment_len, self.decoder.page_size
        allocator = self.decoder.allocator
        admitted: list[tuple[int, SlotRequest, int, list, dict]] = []
        pool = self.state.inner.pool
        while self.waiting and free:
            request = self.waiting[0]
            rid = self._next_rid
            wanted = list(dict.fromkeys(request.memories))
            missing = [m for m in wanted if allocator.memory_pages(m) is None]
            try:
                fetched = self.memory_source(missing) if missing else None
            except Exception as e:  # e.g. the memory was deleted since the request was checked
                self.waiting.pop(0)
                request.error = e
                request.on_tokens([], True)
                continue
            try:
                req_pages, mem_pages, new = allocator.admit(
                    {rid: len(request.prompt) + request.max_tokens}, {m: K for m in wanted}
                )
            except OutOfPages:
                break  # first come, first served: it waits for rows to finish
            self._next_rid += 1
            self.waiting.pop(0)
            if new:
                keys, values = (np.asarray(a)[[missing.index(m) for m in new]] for a in fetched)
                pool = write_memories(pool, [mem_pages[m] for m in new], keys, values)
            admitted.append((free.pop(0), request, rid, req_pages[rid], {m: mem_pages[m] for m in wanted}))
        self.state = self.state.replace(inner=self.state.inner.replace(pool=pool))
        if not admitted:
            return
        host = sampling = self._host
        self._dirty = True
        slot_lens = [min(S, K - j * S) for j in range(self.pages_per_memory)]
        for b, request, rid, pages, mem_pages in admitted:
            n = len(request.prompt)
            for name in self._INNER_FIELDS:
                host[name][b] = 0
            host["tokens"][b, :n] = request.prompt
            host["tok_page_table"][b, : len(pages)] = pages
            row_pages = [p for m in request.memories for p in mem_pages[m]]
            host["mem_page_table"][b, : len(row_pages)] = row_pages
            host["mem_page_lens"][b, : len(row_pages)] = slot_lens * len(request.memories)
            if request.memory_bias is not None:  # each memory's value on each of its page entries
                host["mem_page_bias"][b, : len(row_pages)] = np.repeat(
                    np.asarray(request.memory_bias, np.float32), self.pages_per_memory
                )
            host["total"][b] = host["prompt_lens"][b] = n
            host["pos_offset"][b] = P + K if request.memories else 0
            host["budget"][b] = request.max_tokens
            host["done"][b] = request.max_tokens <= 0
            sampling["temperature"][b] = request.temperature
            sampling["top_p"][b] = request.top_p
            sampling["top_k"][b] = request.top_k
            sampling["seed"][b] = request.seed % 2**32
            request.slot = b
            self._unfed += n - 1
            self.rows[b] = _Row(request, rid, n)
            self._row_memories[b] = list(dict.fromkeys(request.memories))

    def _free(self, slots: list[int]) -> None:
        allocator = self.decoder.allocator
        for b in slots:
            row = self.rows[b]
            allocator.release([row.rid], self._row_memories.pop(b, []))
            self.rows[b] = None
        # A free row feeds nothing: done, and no prompt left to prefill (total == lengths).
        h = self._host
        h["done"][slots] = True
        h["prompt_lens"][slots] = h["total"][slots] = h["lengths"][slots] = 0
        self._dirty = True

    _INNER_FIELDS = (
        "tokens",
        "mem_page_table",
        "mem_page_lens",
        "mem_page_bias",
        "tok_page_table",
        "lengths",
        "total",
        "prompt_lens",
        "pos_offset",
        "budget",
        "done",
    )
    _SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed")

    def _row_fields(self, state: SlotState) -> dict:
        return {
            **{k: getattr(state.inner, k) for k in self._INNER_FIELDS},
            **{k: getattr(state, k) for k in self._SAMPLING_FIELDS},
        }

    def _upload(self) -> None:
        # Every field's rows packed side by side into one int32 array (floats and uint32 by their
        # bits): one transfer and one small program, where a device_put per field cost ~15
        # transfers' worth of host work every chunk that rows joined or left.
        names = (*self._INNER_FIELDS, *self._SAMPLING_FIELDS)
        host = [self._host[k] for k in names]
        B = host[0].shape[0]
        packed = np.concatenate(
            [(a.astype(np.int32) if a.dtype == np.bool_ else a).reshape(B, -1).view(np.int32) for a in host], axis=1
        )
        if self._layout is None:  # the fields' shapes and dtypes never change
            self._layout = tuple((k, a.shape[1:], a.dtype.name) for k, a in zip(names, host))
        new = _unpack_rows(packed, self._layout)
        inner = self.state.inner.replace(**{k: new[k] for k in self._INNER_FIELDS})
        self.state = SlotState(inner, *(new[k] for k in self._SAMPLING_FIELDS))
        self._dirty = False

    def _reset_after_failure(self) -> None:
        """A failed chunk may have consumed the pool: every running row's pages are gone."""
        from grc_jax.inference.pages import PageAllocator, new_pool

        d = self.decoder
        failed = [r.request for r in self.rows if r is not None]
        self.rows = [None] * self.slots
        self._row_memories = {}
        d.allocator = PageAllocator(d.allocator.num_pages, d.page_size)
        self.state = self._empty_state(new_pool(self.config, d.allocator.num_pages, d.page_size))
        self._step = self._unfed = 0
        self._host = {k: np.array(v) for k, v in jax.device_get(self._row_fields(self.state)).items()}
        self._dirty = False
        for request in failed:
            request.error = RuntimeError("the decode step failed; the request was ended")
            try:
                request.on_tokens([], True)
            except Exception:
                pass


class _Lend:
    def __init__(self, batch: SlotBatch):
        self.batch = batch

    def __enter__(self) -> Decoder:
        b = self.batch
        self.allocator = b.decoder.allocator
        b.decoder.pool = b.state.inner.pool
        return b.decoder

    def __exit__(self, *exc) -> None:
        b = self.batch
        d = b.decoder
        pool, d.pool = d.pool, None
        if d.allocator is not self.allocator or pool is None:
            # Decoder.finish starts over with a fresh pool and allocator when a call consumed the
            # pool: the running rows' K/V went with it.
            d.allocator = self.allocator
            b._reset_after_failure()
            return
        b.state = b.state.replace(inner=b.state.inner.replace(pool=pool))
