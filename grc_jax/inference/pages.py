"""The paged KV pool: device K/V arrays for all layers and a host-side page allocator.

One pool of fixed-size pages holds two kinds of pages (docs/design.md section 6):
- memory pages: a memory's K latent slots, shared by every request that reads the memory and
  reference-counted; a memory nobody holds stays resident as a cache until its pages are needed;
- token pages: one request's prompt and generated tokens, private to it.

Page ids index the pool's second axis; every layer uses the same id for the same page, so one
page table serves all layers. The allocator never touches device memory, and every operation
that can run out of pages checks first, so a failed call leaves the pool exactly as it was.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Hashable, Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from grc_jax.config import DTYPES, ModelConfig


class OutOfPages(RuntimeError):
    """The pool has too few free (or evictable) pages for a request."""


@flax.struct.dataclass
class KVPool:
    """K and V pages of every layer: [layers, num_pages, page_size, kv_heads, head_dim] each."""

    k: jax.Array
    v: jax.Array

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def new_pool(config: ModelConfig, num_pages: int, page_size: int) -> KVPool:
    """A zero-filled pool in the model's compute dtype (zeros keep unread slots finite)."""
    if num_pages < 1 or page_size < 1:
        raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages} and {page_size}")
    shape = (config.num_layers, num_pages, page_size, config.num_kv_heads, config.head_dim)
    dtype = DTYPES[config.dtype]
    return KVPool(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def page_bytes(config: ModelConfig, page_size: int) -> int:
    """Bytes one page takes in the pool, K and V of all layers together."""
    itemsize = jnp.dtype(DTYPES[config.dtype]).itemsize
    return 2 * config.num_layers * page_size * config.num_kv_heads * config.head_dim * itemsize


def _write_slots_impl(pool: KVPool, pages: jax.Array, slots: jax.Array, k: jax.Array, v: jax.Array) -> KVPool:
    return KVPool(
        pool.k.at[:, pages, slots].set(k.astype(pool.k.dtype)), pool.v.at[:, pages, slots].set(v.astype(pool.v.dtype))
    )


_write_slots = jax.jit(_write_slots_impl)
_write_slots_donated = jax.jit(_write_slots_impl, donate_argnums=0)


def write_memories(
    pool: KVPool, pages: list[list[int]], keys: np.ndarray, values: np.ndarray, *, donate: bool = True
) -> KVPool:
    """Copies memories into their pages. keys/values: [n, layers, K, kv_heads, head_dim]; pages[i]
    lists memory i's pages (ceil(K / page_size) of them). With donate, `pool` is consumed."""
    keys, values = np.asarray(keys), np.asarray(values)
    n, layers, num_slots = keys.shape[:3]
    if len(pages) != n:
        raise ValueError(f"{len(pages)} page lists for {n} memories")
    if layers != pool.k.shape[0] or keys.shape[3:] != pool.k.shape[3:]:
        raise ValueError(
            f"memories of shape [layers, K, kv_heads, head_dim]={list(keys.shape[1:])} do not fit "
            f"a pool of [layers, ..., kv_heads, head_dim]={[pool.k.shape[0], *pool.k.shape[3:]]}"
        )
    size = pool.page_size
    short = [i for i, p in enumerate(pages) if len(p) != -(-num_slots // size)]
    if short:
        raise ValueError(
            f"memories {short[:8]} have {[len(pages[i]) for i in short[:8]]} pages; K={num_slots} "
            f"slots take {-(-num_slots // size)} pages of {size}"
        )
    slot = np.arange(num_slots)
    flat_pages = np.asarray([[p[j // size] for j in slot] for p in pages], np.int32).reshape(-1)
    flat_slots = np.tile(slot % size, n).astype(np.int32)
    # [n, L, K, ...] -> [L, n*K, ...], the order of (flat_pages, flat_slots)
    k = np.moveaxis(keys, 1, 0).reshape(layers, n * num_slots, *keys.shape[3:])
    v = np.moveaxis(values, 1, 0).reshape(layers, n * num_slots, *values.shape[3:])
    write = _write_slots_donated if donate else _write_slots
    return write(pool, jnp.asarray(flat_pages), jnp.asarray(flat_slots), jnp.asarray(k), jnp.asarray(v))


@dataclasses.dataclass
class _Memory:
    pages: list[int]
    refs: int


class PageAllocator:
    """Host bookkeeping of which page holds what. Not thread-safe: one engine, one caller."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages} and {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # a stack: pages come out 0, 1, 2, ...
        self._refcount = np.zeros(num_pages, np.int32)
        self._memories: dict[Hashable, _Memory] = {}
        self._cached: collections.OrderedDict[Hashable, None] = collections.OrderedDict()  # refs == 0, LRU first
        self._requests: dict[Hashable, list[int]] = {}

    # --- queries -------------------------------------------------------------------------

    def pages_for(self, num_slots: int) -> int:
        return math.ceil(num_slots / self.page_size)

    @property
    def num_free(self) -> int:
        """Pages an allocation may take now: free ones plus those of cached, unheld memories."""
        return len(self._free) + sum(len(self._memories[m].pages) for m in self._cached)

    def refcount(self, page: int) -> int:
        return int(self._refcount[page])

    def memory_pages(self, memory_id: Hashable) -> list[int] | None:
        """The pages of a resident memory, or None."""
        m = self._memories.get(memory_id)
        return None if m is None else list(m.pages)

    def memory_refs(self, memory_id: Hashable) -> int:
        m = self._memories.get(memory_id)
        return 0 if m is None else m.refs

    def request_pages(self, request_id: Hashable) -> list[int]:
        if request_id not in self._requests:
            raise KeyError(f"no request {request_id!r} holds pages")
        return list(self._requests[request_id])

    def snapshot(self) -> tuple:
        """The whole state, for tests and for rollback."""
        return (
            list(self._free),
            self._refcount.copy(),
            {k: _Memory(list(m.pages), m.refs) for k, m in self._memories.items()},
            collections.OrderedDict(self._cached),
            {k: list(v) for k, v in self._requests.items()},
        )

    def restore(self, snapshot: tuple) -> None:
        free, refcount, memories, cached, requests = snapshot
        self._free, self._refcount = list(free), refcount.copy()
        self._memories = {k: _Memory(list(m.pages), m.refs) for k, m in memories.items()}
        self._cached = collections.OrderedDict(cached)
        self._requests = {k: list(v) for k, v in requests.items()}

    # --- token pages ---------------------------------------------------------------------

    def alloc_request(self, request_id: Hashable, num_tokens: int, label: str | None = None) -> list[int]:
        """Private pages for `num_tokens` tokens of a new request; `label` names it in errors."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already holds pages")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        pages = self._take(self.pages_for(num_tokens), f"{label or f'request {request_id!r}'} ({num_tokens} tokens)")
        self._refcount[pages] = 1
        self._requests[request_id] = pages
        return list(pages)

    def free_request(self, request_id: Hashable) -> None:
        if request_id not in self._requests:
            raise KeyError(f"no request {request_id!r} holds pages")
        pages = self._requests.pop(request_id)
        self._refcount[pages] = 0
        self._free.extend(reversed(pages))

    # --- memory pages --------------------------------------------------------------------

    def acquire_memory(self, memory_id: Hashable, num_slots: int) -> tuple[list[int], bool]:
        """Holds a memory's pages: (pages, is_new). A new memory's pages must then be written."""
        m = self._memories.get(memory_id)
        if m is not None:
            if len(m.pages) != self.pages_for(num_slots):
                raise ValueError(
                    f"memory {memory_id!r} is resident with {len(m.pages)} pages, "
                    f"{num_slots} slots need {self.pages_for(num_slots)}"
                )
            if m.refs == 0:
                del self._cached[memory_id]
            m.refs += 1
            self._refcount[m.pages] += 1
            return list(m.pages), False
        pages = self._take(self.pages_for(num_slots), f"memory {memory_id!r}")
        self._memories[memory_id] = _Memory(pages, 1)
        self._refcount[pages] = 1
        return list(pages), True

    def release_memory(self, memory_id: Hashable) -> None:
        """Drops one hold; an unheld memory stays resident (cached) until its pages are needed."""
        m = self._memories.get(memory_id)
        if m is None or m.refs == 0:
            raise KeyError(f"memory {memory_id!r} is not held")
        m.refs -= 1
        self._refcount[m.pages] -= 1
        if m.refs == 0:
            self._cached[memory_id] = None

    def evict_memory(self, memory_id: Hashable) -> None:
        """Forgets a cached memory (e.g. replaced in the bank). A held one cannot be evicted."""
        m = self._memories.get(memory_id)
        if m is None:
            return
        if m.refs:
            raise ValueError(f"memory {memory_id!r} is held by {m.refs} request(s); release it first")
        self._drop_cached(memory_id)

    # --- transactions --------------------------------------------------------------------

    def admit(
        self, requests: dict[Hashable, int], memories: dict[Hashable, int], labels: dict[Hashable, str] | None = None
    ) -> tuple[dict, dict, list]:
        """All or nothing: token pages for each request (id -> tokens, named in errors by
        `labels`) and holds on each memory (id -> slots). Returns (request pages, memory pages,
        ids of memories new to the pool); raises OutOfPages with the pool unchanged."""
        before = self.snapshot()
        try:
            mem_pages, new = {}, []
            for mid, slots in memories.items():
                mem_pages[mid], is_new = self.acquire_memory(mid, slots)
                if is_new:
                    new.append(mid)
            req_pages = {rid: self.alloc_request(rid, n, (labels or {}).get(rid)) for rid, n in requests.items()}
        except BaseException:
            self.restore(before)
            raise
        return req_pages, mem_pages, new

    def release(self, requests: Iterable[Hashable], memories: Iterable[Hashable]) -> None:
        for rid in requests:
            self.free_request(rid)
        for mid in memories:
            self.release_memory(mid)

    # --- internals -----------------------------------------------------------------------

    def _take(self, n: int, what: str) -> list[int]:
        if n > self.num_free:
            held = self.num_pages - self.num_free
            raise OutOfPages(
                f"out of KV pages: {what} needs {n} page(s) of {self.page_size} slots, "
                f"{self.num_free} of {self.num_pages} are free ({held} held); "
                f"make the pool larger (num_pages) or the batch smaller"
            )
        while len(self._free) < n:  # evict the least recently released cached memories
            self._drop_cached(next(iter(self._cached)))
        pages = [self._free.pop() for _ in range(n)]
        return pages

    def _drop_cached(self, memory_id: Hashable) -> None:
        m = self._memories.pop(memory_id)
        del self._cached[memory_id]
        self._free.extend(reversed(m.pages))

    def check(self) -> None:
        """Asserts the bookkeeping invariants (every page in exactly one place)."""
        owners = collections.Counter(self._free)
        for m in self._memories.values():
            owners.update(m.pages)
        for pages in self._requests.values():
            owners.update(pages)
        bad = {p: c for p, c in owners.items() if c != 1}
        if bad or sum(owners.values()) != self.num_pages:
            raise AssertionError(f"page bookkeeping broken: {bad or 'pages missing'}")
