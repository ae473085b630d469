"""The host side of decoding: `Decoder` admits batches of prompts into a page pool and runs them
through the jitted loop (`grc_jax.inference.loop`); `DecodeSettings` is what a caller asks for.

A call's steps: `start` checks the prompts, budgets and memories, fetches the memories that are
not resident, admits the batch's pages (all or nothing), writes the new memories and builds the
loop's initial state; `advance` runs the loop; `finish` takes the pool back and frees the pages.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Iterator, Sequence

import jax
import numpy as np

from grc_jax import compile_cache, model
from grc_jax.config import ModelConfig
from grc_jax.inference import strategy
from grc_jax.inference.loop import DecodeState, LoopSettings, run, run_reason_embed
from grc_jax.inference.pages import OutOfPages, PageAllocator, new_pool, write_memories
from grc_jax.inference.sampling import GREEDY, Sampling

MemorySource = Callable[[Sequence[Hashable]], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """What a generate call asks for. The compiled loop sees `loop_settings()` of it: the
    limit on new tokens goes into each row's budget instead, so it compiles nothing."""

    max_new_tokens: int  # most tokens a row may make; `budgets` may lower it per row
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

    def loop_settings(self, prefill_chunk: int | None = None) -> LoopSettings:
        return LoopSettings(
            sampling=self.sampling,
            stop_token_ids=self.stop_token_ids,
            prefill_chunk=self.prefill_chunk if prefill_chunk is None else prefill_chunk,
            record_logits=self.record_logits,
            impl=self.impl,
        )


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
    settings: LoopSettings
    rows: int
    requests: list[Hashable]
    memories: list[Hashable]


@dataclasses.dataclass
class _Admission:
    """A batch's pages, from `PageAllocator.admit`: what `start` must give back if it fails."""

    requests: list[int]  # one allocator id per row
    memories: list[Hashable]  # every memory the batch reads, once each
    request_pages: dict  # request id -> its token pages
    memory_pages: dict  # memory id -> its pages
    new: list[Hashable]  # memories not resident before: their pages must be written


class Decoder:
    """A model, its page pool and allocator; runs batches of prompts through `loop.run`.

    Not thread-safe. Memories are fetched from `memory_source(ids) -> (keys, values)`
    ([n, layers, K, kv_heads, head_dim] each) when they are not resident in the pool.
    per_layer_weights: hold the layer weights as separate per-layer arrays (`model.unstack_layers`);
    None leaves it to `strategy.layer_weights` (with the reference attention on the CPU only).
    """

    def __init__(
        self,
        config: ModelConfig,
        params: model.Params,
        *,
        num_pages: int = 256,
        page_size: int = 16,
        prefill_chunk: int = 256,
        impl: str | None = None,
        per_layer_weights: bool | None = None,
    ):
        self.config = config
        self.params = strategy.layer_weights(params, impl, per_layer_weights)
        self.page_size, self.prefill_chunk, self.impl = page_size, prefill_chunk, impl
        self.pool = new_pool(config, num_pages, page_size)
        self.allocator = PageAllocator(num_pages, page_size)
        self._next_request = 0

    def settings(
        self,
        max_new_tokens: int,
        sampling: Sampling = GREEDY,
        stop_token_ids: Sequence[int] = (),
        record_logits: bool = False,
    ) -> DecodeSettings:
        return DecodeSettings(
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_token_ids=tuple(stop_token_ids),
            page_size=self.page_size,
            prefill_chunk=self.prefill_chunk,
            record_logits=record_logits,
            impl=self.impl,
        )

    # public calls

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        settings: DecodeSettings,
        *,
        memories: Sequence[Sequence[Hashable]] | None = None,
        memory_source: MemorySource | None = None,
        budgets: Sequence[int] | None = None,
        seed: int = 0,
        memory_bias: Sequence[Sequence[float]] | None = None,
    ) -> list[list[int]]:
        """The new tokens of every row (a stop token that ended a row included).
        memory_bias: per row, one float per memory of `memories` (memory priors, docs/design.md
        section 8), added to the row's attention logits on every key of that memory."""
        out, _ = self.generate_with_logits(
            prompts,
            settings,
            memories=memories,
            memory_source=memory_source,
            budgets=budgets,
            seed=seed,
            memory_bias=memory_bias,
        )
        return out

    def generate_with_logits(
        self,
        prompts: Sequence[Sequence[int]],
        settings: DecodeSettings,
        *,
        memories: Sequence[Sequence[Hashable]] | None = None,
        memory_source: MemorySource | None = None,
        budgets: Sequence[int] | None = None,
        seed: int = 0,
        memory_bias: Sequence[Sequence[float]] | None = None,
    ) -> tuple[list[list[int]], list[np.ndarray] | None]:
        """`generate`, plus each row's per-step logits [new tokens, vocab] with record_logits."""
        batch = self.start(prompts, settings, memories, memory_source, budgets, seed, memory_bias=memory_bias)
        try:
            self.advance(batch, settings.max_new_tokens)
            tokens, prompt_lens, total, logits = jax.device_get(
                (batch.state.tokens, batch.state.prompt_lens, batch.state.total, batch.state.logits)
            )
        finally:
            self.finish(batch)
        out = [tokens[b, prompt_lens[b] : total[b]].tolist() for b in range(batch.rows)]
        if not settings.record_logits:
            return out, None
        return out, [logits[b, : len(out[b])] for b in range(batch.rows)]

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        settings: DecodeSettings,
        *,
        steps_per_chunk: int = 8,
        memories: Sequence[Sequence[Hashable]] | None = None,
        memory_source: MemorySource | None = None,
        budgets: Sequence[int] | None = None,
        seed: int = 0,
        memory_bias: Sequence[Sequence[float]] | None = None,
    ) -> Iterator[list[list[int]]]:
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
                yield [tokens[b, emitted[b] : total[b]].tolist() for b in range(batch.rows)]
                emitted = total
                if done[: batch.rows].all() or step >= settings.max_new_tokens:
                    return
        finally:
            self.finish(batch)

    def reason_embed(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_reason_tokens: int,
        eor_id: int,
        latent_ids: Sequence[int],
        budgets: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, list[list[int]]]:
        """Embeddings [n, dim] after greedy self-reasoning, and each row's reasoning tokens
        (eor included when the model wrote it)."""
        settings = self.settings(max_reason_tokens, GREEDY, (eor_id,))
        K = len(latent_ids)
        batch = self.start(prompts, settings, None, None, budgets, 0, extra=K + 1)
        try:
            batch.state, emb, reasoned = run_reason_embed(
                self.config, batch.settings, self.params, batch.state, tuple(int(i) for i in latent_ids), int(eor_id)
            )
            tokens, prompt_lens, reasoned, emb = jax.device_get(
                (batch.state.tokens, batch.state.prompt_lens, reasoned, emb)
            )
        finally:
            self.finish(batch)
        reasoning = [tokens[b, prompt_lens[b] : reasoned[b]].tolist() for b in range(batch.rows)]
        return np.asarray(emb[: batch.rows]), reasoning

    def advance(self, batch: Batch, until: int) -> None:
        """Runs the batch's prefill (once) and decode steps until step `until` or all rows done."""
        # Through the programs directory of the compilation cache: a fresh process then loads the
        # compiled loop instead of tracing and lowering it (grc_jax/compile_cache.py).
        batch.state = compile_cache.call_serialized(
            "decode_run",
            run,
            (self.config, batch.settings),
            (self.params, batch.state, jax.device_put(np.int32(until))),
        )

    def start(
        self,
        prompts: Sequence[Sequence[int]],
        settings: DecodeSettings,
        memories: Sequence[Sequence[Hashable]] | None = None,
        memory_source: MemorySource | None = None,
        budgets: Sequence[int] | None = None,
        seed: int = 0,
        extra: int = 0,
        memory_bias: Sequence[Sequence[float]] | None = None,
    ) -> Batch:
        """Admits a batch: pages for its rows and memories (all or nothing), memories written,
        the initial state built. The state owns the pool until `finish`; `extra` reserves
        token slots past the budget (the eor and latents of self-reasoning)."""
        if self.pool is None:
            raise RuntimeError("the decoder is running another batch: finish it (or close its stream) first")
        prompts = self._checked_prompts(prompts)
        loop_settings = self._loop_settings(settings, prompts)
        budgets = _checked_budgets(budgets, len(prompts), settings.max_new_tokens)
        memories = _checked_memories(memories, len(prompts), memory_source)
        bias_rows = _memory_bias_rows(memory_bias, memories)
        wanted = list(dict.fromkeys(m for row in memories for m in row))
        # Fetch before allocating: an unknown id or a misshapen memory must fail with the pool untouched.
        fetched = self._fetch(wanted, memory_source) if wanted else None
        admission = self._admit(prompts, budgets, extra, wanted)
        # From here to the state, any failure (a memory write, a bad seed, an interrupt) gives the
        # batch's pages back: a page kept by a failed start would be lost for good.
        try:
            self._write_new_memories(admission, fetched)
            state = self._initial_state(prompts, memories, budgets, extra, seed, settings, admission, bias_rows)
        except BaseException:
            self._give_back(admission)
            raise
        self.pool = None  # the state owns it until `finish` hands it back
        return Batch(state, loop_settings, len(prompts), admission.requests, wanted)

    def finish(self, batch: Batch) -> None:
        """Takes the pool back from the batch's (last) state and frees the batch's pages."""
        pool = batch.state.pool
        if pool.k.is_deleted() or pool.v.is_deleted():
            # The call that consumed the pool failed: its pages' contents are gone.
            self._reset_pool()
            return
        self.pool = pool
        self.allocator.release(batch.requests, batch.memories)

    # the steps of `start`

    def _checked_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        if len(prompts) == 0:
            raise ValueError("no prompts")
        prompts = [list(map(int, p)) for p in prompts]
        vocab = self.config.total_vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; a row needs at least one token")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:4]}")
        return prompts

    def _loop_settings(self, settings: DecodeSettings, prompts: list[list[int]]) -> LoopSettings:
        """The compiled loop's settings. A prefill call costs its capacity in query rows, used or
        not: no more rows than the prompts need (bucketed, and at least 32 so short prompts share
        one compiled program)."""
        if settings.page_size != self.page_size:
            raise ValueError(f"settings.page_size={settings.page_size} but the pool's pages hold {self.page_size}")
        return settings.loop_settings(
            prefill_chunk=min(settings.prefill_chunk, bucket(sum(len(p) - 1 for p in prompts), 32))
        )

    def _fetch(self, wanted: list[Hashable], memory_source: MemorySource) -> tuple[np.ndarray, np.ndarray]:
        """The wanted memories' keys and values from `memory_source`, their shapes checked."""
        c = self.config
        fetched = tuple(np.asarray(a) for a in memory_source(wanted))
        expected = [len(wanted), c.num_layers, c.num_latents, c.num_kv_heads, c.head_dim]
        for what, array in zip(("keys", "values"), fetched):
            if list(array.shape) != expected:
                raise ValueError(
                    f"memory_source gave {what} of shape {list(array.shape)} for memories "
                    f"{wanted[:8]}; this model reads [memories, layers, K, kv_heads, head_dim]="
                    f"{expected}"
                )
        return fetched

    def _admit(self, prompts: list[list[int]], budgets: list[int], extra: int, wanted: list[Hashable]) -> _Admission:
        """Pages for every row's prompt, budget and `extra` slots, and for the wanted memories."""
        K = self.config.num_latents
        ids = [self._next_request + i for i in range(len(prompts))]
        self._next_request += len(prompts)
        need = {rid: len(p) + b + extra for rid, p, b in zip(ids, prompts, budgets)}
        try:
            req_pages, mem_pages, new = self.allocator.admit(
                need, {m: K for m in wanted}, labels={rid: f"prompt {i}" for i, rid in enumerate(ids)}
            )
        except OutOfPages as e:
            token_pages = [self.allocator.pages_for(t) for t in need.values()]
            raise OutOfPages(
                f"{e}; this batch's prompts need {token_pages} token pages and its {len(wanted)} "
                f"memories {self.allocator.pages_for(K)} each"
            ) from None
        return _Admission(ids, wanted, req_pages, mem_pages, new)

    def _write_new_memories(self, admission: _Admission, fetched: tuple[np.ndarray, np.ndarray] | None) -> None:
        if not admission.new:
            return
        keys, values = fetched
        order = [admission.memories.index(m) for m in admission.new]
        self.pool = write_memories(
            self.pool,
            [admission.memory_pages[m] for m in admission.new],
            np.asarray(keys)[order],
            np.asarray(values)[order],
        )

    def _give_back(self, admission: _Admission) -> None:
        """Undoes `_admit` after a failed start."""
        if self.pool is not None and (self.pool.k.is_deleted() or self.pool.v.is_deleted()):
            self._reset_pool()  # consumed by a failed write: start over with an empty pool
            return
        self.allocator.release(admission.requests, admission.memories)
        for m in admission.new:
            self.allocator.evict_memory(m)

    def _reset_pool(self) -> None:
        self.pool = new_pool(self.config, self.allocator.num_pages, self.page_size)
        self.allocator = PageAllocator(self.allocator.num_pages, self.page_size)

    def _initial_state(
        self,
        prompts: list[list[int]],
        memories: list[list[Hashable]],
        budgets: list[int],
        extra: int,
        seed: int,
        settings: DecodeSettings,
        admission: _Admission,
        bias_rows: list[list[float]] | None,
    ) -> DecodeState:
        """The loop's state for admitted rows: buffers, page tables, positions and budgets, padded
        to bucketed shapes (rows, buffer width, memory entries) so few programs compile."""
        c, S, K = self.config, self.page_size, self.config.num_latents
        rng = jax.random.key(seed)
        B = bucket(len(prompts))
        W = length_bucket(max(len(p) + b + extra for p, b in zip(prompts, budgets)), S)
        pages_per_mem = -(-K // S)
        M = strategy.memory_table_width(max(len(m) for m in memories) * pages_per_mem, self.impl)
        tokens = np.zeros((B, W), np.int32)
        tok_table = np.zeros((B, -(-W // S)), np.int32)
        mem_table = np.zeros((B, M), np.int32)
        mem_lens = np.zeros((B, M), np.int32)
        prompt_lens = np.zeros(B, np.int32)
        offset = np.zeros(B, np.int32)
        budget = np.zeros(B, np.int32)
        slot_lens = [min(S, K - j * S) for j in range(pages_per_mem)]
        for b, (p, rid) in enumerate(zip(prompts, admission.requests)):
            tokens[b, : len(p)] = p
            prompt_lens[b], budget[b] = len(p), budgets[b]
            pages = admission.request_pages[rid]
            tok_table[b, : len(pages)] = pages
            row_pages = [pg for m in memories[b] for pg in admission.memory_pages[m]]
            mem_table[b, : len(row_pages)] = row_pages
            mem_lens[b, : len(row_pages)] = slot_lens * len(memories[b])
            offset[b] = c.max_segment_len + K if memories[b] else 0
        # The recorded logits' rows: a bucketed bound of max_new_tokens, so few shapes compile.
        recorded_steps = bucket(settings.max_new_tokens) if settings.record_logits else 0
        mem_bias = None
        if bias_rows is not None:  # each memory's value on each of its page entries
            mem_bias = np.zeros((B, M), np.float32)
            for b, row in enumerate(bias_rows):
                per_page = np.repeat(np.asarray(row, np.float32), pages_per_mem)
                mem_bias[b, : len(per_page)] = per_page
        # One transfer of fresh copies (the state is donated; jnp.asarray and jnp.zeros would each
        # run a small compiled program per shape).
        host = dict(
            tokens=tokens,
            mem_page_table=mem_table,
            mem_page_lens=mem_lens,
            tok_page_table=tok_table,
            lengths=np.zeros(B, np.int32),
            total=prompt_lens,
            prompt_lens=prompt_lens,
            pos_offset=offset,
            budget=budget,
            done=budget <= 0,
            step=np.zeros((), np.int32),
            logits=np.zeros((B, recorded_steps, c.vocab_size), np.float32),
            mem_page_bias=mem_bias,
        )
        return DecodeState(pool=self.pool, rng=rng, **jax.device_put(host, may_alias=False))


def _checked_budgets(budgets: Sequence[int] | None, n: int, max_new_tokens: int) -> list[int]:
    """Each row's budget of new tokens: max_new_tokens by default, never more."""
    if budgets is None:
        return [max_new_tokens] * n
    budgets = [int(b) for b in budgets]
    if len(budgets) != n or any(not 0 <= b <= max_new_tokens for b in budgets):
        raise ValueError(f"budgets must be {n} values in [0, max_new_tokens={max_new_tokens}], got {budgets}")
    return budgets


def _checked_memories(
    memories: Sequence[Sequence[Hashable]] | None, n: int, memory_source: MemorySource | None
) -> list[list[Hashable]]:
    """Each row's memory ids (none by default)."""
    memories = [list(m) for m in memories] if memories is not None else [[] for _ in range(n)]
    if len(memories) != n:
        raise ValueError(f"{len(memories)} memory lists for {n} prompts")
    if any(memories) and memory_source is None:
        raise ValueError("memories were named but no memory_source was given")
    return memories


def _memory_bias_rows(
    memory_bias: Sequence[Sequence[float]] | None, memories: list[list[Hashable]]
) -> list[list[float]] | None:
    """Checks a per-row, per-memory bias against the rows' memories (before anything is allocated)."""
    if memory_bias is None:
        return None
    rows = [[float(x) for x in row] for row in memory_bias]
    if len(rows) != len(memories) or any(len(r) != len(m) for r, m in zip(rows, memories)):
        raise ValueError(
            f"memory_bias must give one value per memory of each row: memories per row "
            f"{[len(m) for m in memories]}, bias values per row {[len(r) for r in rows]}"
        )
    if not all(np.isfinite(r).all() for r in rows):
        raise ValueError("memory_bias values must be finite")
    return rows
