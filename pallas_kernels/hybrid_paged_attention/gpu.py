"""Hybrid paged attention in Pallas for GPU (Triton lowering).

Grid: (query block, kv head, kv split). A program takes `q_block` query tokens times the
`group` query heads of one kv head as a [rows, head_dim] matrix (rows padded to a power of
two >= 16 for Triton's dot), walks the sequences owning rows of the block and, for each, its
share of the KV steps (memory pages first, then token pages), gathering `pages_per_block`
pages per step straight from the pool. Each split keeps its own online softmax (m, l, acc);
a small XLA step combines the splits (flash-decoding). Decode-shaped batches default to one
token per block and several splits; prefill-shaped ones to bigger blocks and one split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .reference import block_seq_ranges, safe_page_bias, safe_page_tables


def _precision(dtype) -> lax.Precision | None:
    # f32 dots in IEEE f32, not TF32; bf16 products are exact in the f32 accumulator anyway.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _cdiv(a, b):
    return (a + b - 1) // b


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _kernel(
    cu_ref,
    tok_lens_ref,
    n_mem_ref,
    mem_lens_ref,
    table_ref,
    lo_ref,
    hi_ref,
    *refs,
    page_size,
    ppb,
    group,
    q_block,
    num_kv_heads,
    mem_entries,
    entries,
    splits,
    sm_scale,
    soft_cap,
    pv_dtype,
    has_bias,
):
    # With a bias, its flat per-entry values come after the scalars; then the usual refs.
    bias_ref = refs[0] if has_bias else None
    q_ref, k_ref, v_ref, o_ref, m_out_ref, l_out_ref = refs[1:] if has_bias else refs
    blk, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, head_dim = q_ref.shape
    cols = ppb * page_size
    blk_start = blk * q_block
    blk_end = blk_start + q_block
    q = q_ref[...]
    r = jnp.arange(rows, dtype=jnp.int32)[:, None]
    c = jnp.arange(cols, dtype=jnp.int32)
    page_in_step, offset = c // page_size, c % page_size

    def seq_body(s, carry):
        q_start, q_end = cu_ref[s], cu_ref[s + 1]
        tok_len = tok_lens_ref[s]
        n_mem = n_mem_ref[s]
        mem_steps = _cdiv(n_mem, ppb)
        # The block's last row of s sits at position tok_len - q_end + min(q_end, blk_end) - 1.
        tok_seen = tok_len - q_end + jnp.minimum(q_end, blk_end)
        tok_pages = _cdiv(tok_seen, page_size)
        n = jnp.where(q_end > q_start, mem_steps + _cdiv(tok_pages, ppb), 0)
        per_split = _cdiv(n, splits)
        i0 = jnp.minimum(split * per_split, n)
        i1 = jnp.minimum(i0 + per_split, n)
        r0 = (jnp.maximum(q_start, blk_start) - blk_start) * group
        r1 = (jnp.minimum(q_end, blk_end) - blk_start) * group
        base = tok_len - q_end + blk_start  # position of row r is base + r // group
        row_ok = (r >= r0) & (r < r1)

        def step(i, carry):
            acc, m, l = carry
            is_mem = i < mem_steps
            entry = jnp.where(is_mem, i * ppb, mem_entries + (i - mem_steps) * ppb) + page_in_step
            fetch = entry < jnp.where(is_mem, n_mem, mem_entries + tok_pages)
            page = plgpu.load(table_ref.at[s * entries + jnp.minimum(entry, entries - 1)], mask=fetch, other=0)
            mem_entry = jnp.minimum(i * ppb + page_in_step, mem_entries - 1)
            n_valid = mem_lens_ref[s * mem_entries + mem_entry]
            if bias_ref is not None:  # entries were zeroed where unused; token steps get none
                col_bias = jnp.where(is_mem, bias_ref[s * mem_entries + mem_entry], 0.0)
            pos = (i - mem_steps) * cols + c
            col_ok = jnp.where(is_mem, fetch & (offset < n_valid), pos < tok_seen)
            key_pos = jnp.where(is_mem, -1, pos)
            # Pool viewed as [num_pages * page_size * num_kv_heads, head_dim] rows.
            kv_rows = (page * page_size + offset) * num_kv_heads + h
            # Unneeded slots are not read at all: masked loads yield 0 (never NaN) there.
            kv_mask = jnp.broadcast_to(col_ok[:, None], (cols, head_dim))
            kv_idx = (kv_rows[:, None], jnp.arange(head_dim, dtype=jnp.int32)[None, :])
            k = plgpu.load(k_ref.at[kv_idx], mask=kv_mask, other=0)
            v = plgpu.load(v_ref.at[kv_idx], mask=kv_mask, other=0)
            qk_dtype = jnp.promote_types(q.dtype, k.dtype)
            logits = (
                plgpu.dot(q.astype(qk_dtype), k.astype(qk_dtype), trans_b=True, precision=_precision(qk_dtype))
                * sm_scale
            )
            if soft_cap is not None:
                logits = soft_cap * jnp.tanh(logits / soft_cap)
            if bias_ref is not None:
                logits = logits + col_bias[None, :]
            vis = row_ok & col_ok[None, :] & ((key_pos[None, :] - base) * group <= r)
            logits = jnp.where(vis, logits, -jnp.inf)
            m_new = jnp.maximum(m, logits.max(axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw nothing yet
            alpha = jnp.exp(m - m_safe)
            p = jnp.where(vis, jnp.exp(logits - m_safe[:, None]), 0.0)
            pv = plgpu.dot(p.astype(pv_dtype), v.astype(pv_dtype), precision=_precision(pv_dtype))
            return alpha[:, None] * acc + pv, m_new, alpha * l + p.sum(axis=1)

        return lax.fori_loop(i0, i1, step, carry)

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(lo_ref[blk], hi_ref[blk], seq_body, init)
    o_ref[...] = acc
    m_out_ref[...] = m
    l_out_ref[...] = l


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "soft_cap",
        "interpret",
        "q_block",
        "pages_per_block",
        "kv_splits",
        "pv_in_kv_dtype",
        "num_warps",
        "num_stages",
    ),
)
def hybrid_paged_attention_gpu(
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
    interpret: bool = False,
    q_block: int | None = None,
    pages_per_block: int | None = None,
    kv_splits: int | None = None,
    pv_in_kv_dtype: bool = False,
    num_warps: int = 4,
    num_stages: int = 2,
    mem_page_bias: jax.Array | None = None,
) -> jax.Array:
    """Arguments as for `hybrid_paged_attention` (dispatch.py), plus tuning knobs.
    Needs power-of-two head_dim (>= 16) and page_size.
    q_block: query tokens per program; pages_per_block: pages per KV step; kv_splits: KV
    partitions per sequence (flash-decoding); pv_in_kv_dtype: feed the softmax weights to the
    PV dot in the K/V dtype (tensor cores for bf16, weights rounded) instead of float32."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    num_seqs = tok_lens.shape[0]
    group = num_q_heads // num_kv_heads
    for name, x in (("head_dim", head_dim), ("page_size", page_size)):
        if x & (x - 1):
            raise ValueError(f"the Triton kernel needs a power-of-two {name}, got {x}")
    if head_dim < 16:
        raise ValueError(f"the Triton kernel needs head_dim >= 16, got {head_dim}")
    decode_shaped = num_tokens <= num_seqs
    qb = q_block or (1 if decode_shaped else max(1, 64 // group))
    ppb = pages_per_block or max(_cdiv(16, page_size), 64 // page_size, 1)
    if ppb & (ppb - 1) or ppb * page_size < 16:
        raise ValueError(f"pages_per_block must be a power of two with >= 16 slots, got {ppb}")
    num_blocks = _cdiv(num_tokens, qb)
    rows = _pow2_at_least(max(16, qb * group))

    mem_ids, tok_ids = safe_page_tables(mem_page_table, mem_page_lens, tok_page_table, tok_lens, num_pages, page_size)
    # Whole steps of ppb entries, and at least one step even for a zero-width memory table.
    pad_to = lambda x, n: jnp.pad(x, ((0, 0), (0, max(1, _cdiv(x.shape[1], n)) * n - x.shape[1])))
    mem_ids, mem_lens, tok_ids = pad_to(mem_ids, ppb), pad_to(mem_page_lens, ppb), pad_to(tok_ids, ppb)
    mem_entries = mem_ids.shape[1]
    max_steps = (mem_entries + tok_ids.shape[1]) // ppb
    splits = kv_splits or (min(8, max_steps) if decode_shaped else 1)
    entry = jnp.arange(mem_entries, dtype=jnp.int32)
    # Entries after the last used one are never read; holes before it are masked.
    n_mem = jnp.max(jnp.where(mem_lens > 0, entry + 1, 0), axis=1).astype(jnp.int32)
    table = jnp.concatenate([mem_ids, tok_ids], axis=1)
    lo, hi = block_seq_ranges(cu_q_lens, num_blocks, qb)
    scalars = (
        cu_q_lens.astype(jnp.int32),
        tok_lens.astype(jnp.int32),
        n_mem,
        mem_lens.reshape(-1).astype(jnp.int32),
        table.reshape(-1),
        lo,
        hi,
    )
    if mem_page_bias is not None:
        scalars += (pad_to(safe_page_bias(mem_page_bias, mem_page_lens), ppb).reshape(-1),)

    qp = jnp.pad(q, ((0, num_blocks * qb - num_tokens), (0, 0), (0, 0)))
    qp = qp.reshape(num_blocks, qb, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    qp = qp.reshape(num_blocks, num_kv_heads, qb * group, head_dim)
    qp = jnp.pad(qp, ((0, 0), (0, 0), (0, rows - qb * group), (0, 0)))
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
    kernel = functools.partial(
        _kernel,
        page_size=page_size,
        ppb=ppb,
        group=group,
        q_block=qb,
        num_kv_heads=num_kv_heads,
        mem_entries=mem_entries,
        entries=table.shape[1],
        splits=splits,
        sm_scale=head_dim**-0.5 if sm_scale is None else sm_scale,
        soft_cap=soft_cap,
        pv_dtype=k_pages.dtype if pv_in_kv_dtype else jnp.float32,
        has_bias=mem_page_bias is not None,
    )
    # Row-major reshape: free on GPU.
    k_flat = k_pages.reshape(-1, head_dim)
    v_flat = v_pages.reshape(-1, head_dim)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads, splits),
        in_specs=[
            *(whole(x) for x in scalars),
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h, j: (b, h, 0, 0)),
            whole(k_flat),
            whole(v_flat),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, j: (j, b, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, j: (j, b, h, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, j: (j, b, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, num_blocks, num_kv_heads, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((splits, num_blocks, num_kv_heads, rows), jnp.float32),
            jax.ShapeDtypeStruct((splits, num_blocks, num_kv_heads, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="hybrid_paged_attention",
    )(*scalars, qp, k_flat, v_flat)

    # Combine the splits' partial softmaxes; rows nobody saw (m = -inf everywhere) give 0.
    m_all = m.max(axis=0)
    w = jnp.exp(m - jnp.where(m_all == -jnp.inf, 0.0, m_all))
    num = (w[..., None] * acc).sum(axis=0)
    den = (w * l).sum(axis=0)[..., None]
    out = (num / jnp.where(den == 0.0, 1.0, den))[:, :, : qb * group].astype(q.dtype)
    out = out.reshape(num_blocks, num_kv_heads, qb, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(num_blocks * qb, num_q_heads, head_dim)[:num_tokens]
