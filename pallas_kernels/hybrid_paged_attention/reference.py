"""Plain-XLA hybrid paged attention: the definition of the semantics, and the CPU path.

Query row r of sequence s (q_len = cu_q_lens[s+1] - cu_q_lens[s]) sits at token position
p = tok_lens[s] - q_len + (r - cu_q_lens[s]) = tok_lens[s] - cu_q_lens[s+1] + r. It sees every
valid slot of s's memory pages (slot t of entry j valid iff t < mem_page_lens[s, j]) and
token slots 0..p of s's token pages, under one float32 softmax.

The bookkeeping helpers below are shared with the Pallas wrappers so that all three
implementations agree on what a row, a position and a usable page-table entry are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Bytes of gathered K/V (float32) that one lax.map chunk of query rows may hold.
_CHUNK_BYTES = 256 * 2**20


def query_rows(cu_q_lens: jax.Array, tok_lens: jax.Array, num_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sequence, token position, is-real) of every query row; padding rows get valid=False."""
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    # side="right" skips sequences with q_len 0: it counts the sequences ending at or before r.
    seq = jnp.searchsorted(cu_q_lens[1:], rows, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, cu_q_lens.shape[0] - 2)
    valid = rows < cu_q_lens[-1]
    pos = tok_lens[seq] - cu_q_lens[seq + 1] + rows
    return seq, pos, valid


def safe_page_tables(
    mem_page_table: jax.Array,
    mem_page_lens: jax.Array,
    tok_page_table: jax.Array,
    tok_lens: jax.Array,
    num_pages: int,
    page_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Page tables with every unused entry replaced by page 0, so any entry may be read."""
    mem = jnp.where(mem_page_lens > 0, jnp.clip(mem_page_table, 0, num_pages - 1), 0)
    used_tok_pages = (tok_lens + page_size - 1) // page_size
    tok_used = jnp.arange(tok_page_table.shape[1])[None, :] < used_tok_pages[:, None]
    tok = jnp.where(tok_used, jnp.clip(tok_page_table, 0, num_pages - 1), 0)
    return mem.astype(jnp.int32), tok.astype(jnp.int32)


def safe_page_bias(mem_page_bias: jax.Array, mem_page_lens: jax.Array) -> jax.Array:
    """float32 per-memory-page bias with every unused entry set to 0: an entry a sequence does
    not own may hold anything (NaN included) and must not reach the softmax."""
    return jnp.where(mem_page_lens > 0, mem_page_bias.astype(jnp.float32), 0.0)


def block_seq_ranges(cu_q_lens: jax.Array, num_blocks: int, block_tokens: int) -> tuple[jax.Array, jax.Array]:
    """[lo, hi) range of sequences that own rows of each block of `block_tokens` query rows."""
    total = cu_q_lens[-1]
    start = jnp.arange(num_blocks, dtype=jnp.int32) * block_tokens
    last = jnp.minimum(start + block_tokens, total) - 1
    seq_of = lambda r: jnp.searchsorted(cu_q_lens[1:], r, side="right").astype(jnp.int32)
    nonempty = start < total
    return jnp.where(nonempty, seq_of(start), 0), jnp.where(nonempty, seq_of(last) + 1, 0)


def hybrid_paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    cu_q_lens: jax.Array,
    mem_page_table: jax.Array,
    mem_page_lens: jax.Array,
    tok_page_table: jax.Array,
    tok_lens: jax.Array,
    *,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
    mem_page_bias: jax.Array | None = None,
) -> jax.Array:
    """Gathers each query row's pages, masks, and takes a float32 softmax.

    Cost: every query row gathers its sequence's whole K/V, so memory grows with
    num_tokens * (max_mem_pages + max_tok_pages) * page_size; rows are processed in chunks
    (lax.map) to bound it. Serving-sized batches belong on the Pallas kernels.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    seq, pos, valid = query_rows(cu_q_lens, tok_lens, num_tokens)
    mem_ids, tok_ids = safe_page_tables(mem_page_table, mem_page_lens, tok_page_table, tok_lens, num_pages, page_size)
    slot = jnp.arange(page_size)
    bias = None if mem_page_bias is None else safe_page_bias(mem_page_bias, mem_page_lens)
    tok_slots = jnp.arange(tok_ids.shape[1] * page_size)
    hi = lax.Precision.HIGHEST  # f32 matmuls must not drop to bf16 passes on TPU

    def one_row(args):
        q_row, s, p, ok = args
        ids = jnp.concatenate([mem_ids[s], tok_ids[s]])
        k = k_pages[ids].reshape(-1, num_kv_heads, head_dim).astype(jnp.float32)
        v = v_pages[ids].reshape(-1, num_kv_heads, head_dim).astype(jnp.float32)
        mem_vis = (slot[None, :] < mem_page_lens[s][:, None]).reshape(-1)
        vis = jnp.concatenate([mem_vis, tok_slots <= p]) & ok
        qg = q_row.reshape(num_kv_heads, group, head_dim).astype(jnp.float32)
        logits = jnp.einsum("kgd,lkd->kgl", qg, k, precision=hi) * scale
        if soft_cap is not None:
            logits = soft_cap * jnp.tanh(logits / soft_cap)
        if bias is not None:  # one scalar per memory page, on each of its slots; none on tokens
            per_slot = jnp.repeat(bias[s], page_size)
            logits = logits + jnp.concatenate([per_slot, jnp.zeros(tok_slots.shape, jnp.float32)])
        logits = jnp.where(vis, logits, -jnp.inf)
        m = logits.max(axis=-1, keepdims=True)
        w = jnp.where(vis, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
        denom = w.sum(axis=-1, keepdims=True)
        # Zero invalid V rows: stale slots may hold anything, and 0 * NaN is NaN.
        v = jnp.where(vis[:, None, None], v, 0.0)
        out = jnp.einsum("kgl,lkd->kgd", w, v, precision=hi) / jnp.where(denom == 0, 1.0, denom)
        return out.reshape(num_q_heads, head_dim)

    row_bytes = 2 * 4 * (mem_ids.shape[1] + tok_ids.shape[1]) * page_size * num_kv_heads * head_dim
    chunk = max(1, min(num_tokens, _CHUNK_BYTES // row_bytes))
    out = lax.map(one_row, (q, seq, pos, valid), batch_size=chunk)
    return out.astype(q.dtype)
