"""The page pool: allocation, free list, shared reference-counted memory pages, eviction,
all-or-nothing failure, and writing memories into device pages."""

from __future__ import annotations

import numpy as np
import pytest

from grc_jax.config import ModelConfig
from grc_jax.inference.pages import OutOfPages, PageAllocator, new_pool, page_bytes, write_memories


def plain(alloc: PageAllocator):
    """The allocator's whole state as comparable Python values."""
    free, refcount, memories, cached, requests = alloc.snapshot()
    return (
        sorted(free),
        refcount.tolist(),
        {k: (m.pages, m.refs) for k, m in memories.items()},
        list(cached),
        requests,
    )


def test_token_pages_are_private_and_return_to_the_free_list():
    alloc = PageAllocator(num_pages=8, page_size=4)
    a = alloc.alloc_request("a", 9)  # 9 tokens -> 3 pages
    b = alloc.alloc_request("b", 4)
    assert len(a) == 3 and len(b) == 1 and not set(a) & set(b)
    assert [alloc.refcount(p) for p in a + b] == [1, 1, 1, 1]
    assert alloc.num_free == 4
    alloc.free_request("a")
    assert alloc.num_free == 7 and [alloc.refcount(p) for p in a] == [0, 0, 0]
    c = alloc.alloc_request("c", 12)
    assert sorted(c) == sorted(a)  # freed pages are reused
    alloc.check()


def test_memory_pages_are_shared_and_reference_counted():
    alloc = PageAllocator(num_pages=8, page_size=4)
    pages, new = alloc.acquire_memory("m", 6)  # K=6 slots -> 2 pages
    again, new2 = alloc.acquire_memory("m", 6)
    assert new and not new2 and again == pages and len(pages) == 2
    assert [alloc.refcount(p) for p in pages] == [2, 2] and alloc.memory_refs("m") == 2
    alloc.release_memory("m")
    assert [alloc.refcount(p) for p in pages] == [1, 1]
    alloc.release_memory("m")
    # unheld but resident: reusable by the next request without a rewrite, yet counted free
    assert alloc.memory_pages("m") == pages and alloc.num_free == 8
    assert alloc.acquire_memory("m", 6) == (pages, False)
    alloc.check()


def test_cached_memories_are_evicted_least_recently_released_first():
    alloc = PageAllocator(num_pages=4, page_size=4)
    for m in ("old", "new", "held"):
        alloc.acquire_memory(m, 4)
    alloc.release_memory("old")
    alloc.release_memory("new")
    alloc.alloc_request("r", 8)  # needs 2 pages: 1 free + the oldest cached memory's page
    assert alloc.memory_pages("old") is None
    assert alloc.memory_pages("new") is not None and alloc.memory_pages("held") is not None
    with pytest.raises(OutOfPages):  # "held" is in use: never evicted
        alloc.alloc_request("s", 8)
    alloc.check()


def test_out_of_pages_is_a_clear_error_that_leaves_the_pool_as_it_was():
    alloc = PageAllocator(num_pages=6, page_size=4)
    alloc.alloc_request("a", 8)
    alloc.acquire_memory("held", 4)
    alloc.acquire_memory("cached", 4)
    alloc.release_memory("cached")
    before = plain(alloc)
    with pytest.raises(OutOfPages, match=r"request 'big' \(17 tokens\) needs 5 page\(s\) of 4 slots, 3 of 6 are free"):
        alloc.alloc_request("big", 17)
    assert plain(alloc) == before  # the cached memory was not evicted for a request that failed anyway
    # a transaction failing on its last item rolls back the items before it
    with pytest.raises(OutOfPages, match="out of KV pages"):
        alloc.admit({"r1": 4, "r2": 9}, {"held": 4, "cached": 4, "fresh": 4})
    assert plain(alloc) == before
    alloc.check()


def test_admit_returns_pages_and_the_memories_that_need_writing():
    alloc = PageAllocator(num_pages=8, page_size=2)
    alloc.acquire_memory("x", 4)
    req, mem, new = alloc.admit({"r": 3}, {"x": 4, "y": 4})
    assert new == ["y"] and len(mem["x"]) == 2 and len(mem["y"]) == 2 and len(req["r"]) == 2
    alloc.release(["r"], ["x", "y"])
    assert alloc.memory_refs("x") == 1 and alloc.memory_refs("y") == 0
    alloc.check()


def test_misuse_gets_errors_that_name_the_problem():
    alloc = PageAllocator(num_pages=4, page_size=4)
    alloc.alloc_request("a", 1)
    with pytest.raises(ValueError, match="request 'a' already holds pages"):
        alloc.alloc_request("a", 1)
    with pytest.raises(KeyError, match="no request 'zz' holds pages"):
        alloc.free_request("zz")
    with pytest.raises(KeyError, match="memory 'm' is not held"):
        alloc.release_memory("m")
    alloc.acquire_memory("m", 4)
    with pytest.raises(ValueError, match="memory 'm' is held by 1 request"):
        alloc.evict_memory("m")
    with pytest.raises(ValueError, match="resident with 1 pages, 8 slots need 2"):
        alloc.acquire_memory("m", 8)
    with pytest.raises(ValueError, match="num_pages and page_size must be >= 1"):
        PageAllocator(0, 4)
    alloc.check()


def test_write_memories_fills_exactly_the_named_pages_and_slots():
    config = ModelConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        num_latents=3,
    )
    pool = new_pool(config, num_pages=5, page_size=2)
    assert pool.k.shape == (2, 5, 2, 1, 4) and pool.nbytes == 5 * page_bytes(config, 2)
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2, 2, 3, 1, 4)).astype(np.float32)  # [memories, layers, K, kv, d]
    values = rng.standard_normal((2, 2, 3, 1, 4)).astype(np.float32)
    pool = write_memories(pool, [[4, 1], [0, 3]], keys, values)
    k, v = np.asarray(pool.k), np.asarray(pool.v)
    np.testing.assert_array_equal(k[:, 4, :2], keys[0][:, :2])
    np.testing.assert_array_equal(k[:, 1, 0], keys[0][:, 2])
    np.testing.assert_array_equal(v[:, 3, 0], values[1][:, 2])
    np.testing.assert_array_equal(k[:, 2], 0)  # untouched page
    np.testing.assert_array_equal(k[:, 1, 1], 0)  # the slot past the memory's K
    with pytest.raises(ValueError, match="do not fit a pool"):
        write_memories(pool, [[2]], keys[:1, :, :, :, :2], values[:1, :, :, :, :2])
    with pytest.raises(ValueError, match=r"memories \[1\] have \[1\] pages; K=3 slots take 2 pages of 2"):
        write_memories(pool, [[2, 0], [1]], keys, values)
    assert not pool.k.is_deleted()  # failed writes raise before consuming the donated pool
