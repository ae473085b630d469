"""Hybrid paged attention in Pallas for TPU (Mosaic).

Grid: one program per block of `q_block` query tokens. A block may hold rows of several
sequences (ragged batch); the program walks those sequences and, for each, a list of KV
steps of `pages_per_block` pages: first the memory pages, then the token pages up to the
last position any of its rows can see. Steps are fetched HBM->VMEM by manual DMAs, double
buffered: step n+1 (possibly of the next sequence) is in flight while step n is computed;
only each program's first fetch is exposed.
Whole pages are copied (all KV heads, contiguous), and each KV head's query heads form one
[q_block * group, head_dim] matrix, so the K/V of a page is read from HBM once per block.

Query layout inside the kernel: [kv_head, q_block * group, head_dim]; row r is token r // group
of the block and query head kv_head * group + r % group.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .reference import block_seq_ranges, safe_page_bias, safe_page_tables

_MEM_POS = 1 << 20  # memory slots sit at position -_MEM_POS: before every token
_LANES = 128  # m and l are kept lane-broadcast: Mosaic wants 128-lane-aligned stores


def _precision(dtype) -> lax.Precision | None:
    # f32 operands must not be cut to one bf16 pass on the MXU; bf16 products are exact anyway.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _cdiv(a, b):
    if isinstance(a, int):
        return (a + b - 1) // b
    # lax.div truncates (same as floor here, a >= 0); `//` lowers via sign(), which Mosaic
    # can only lower knowing the TPU generation, i.e. not when exporting from a CPU host.
    return lax.div(a + b - 1, jnp.int32(b))


def _kernel(
    # scalar prefetch (SMEM)
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
    mem_entries,
    entries,
    sm_scale,
    soft_cap,
    pv_dtype,
    has_bias,
):
    # With a bias its per-entry values come first (SMEM, float32), then the usual refs.
    bias_ref = refs[0] if has_bias else None
    (q_ref, k_hbm, v_hbm, o_ref, k_buf, v_buf, sems, m_ref, l_ref, acc_ref) = refs[1:] if has_bias else refs
    _body(
        cu_ref,
        tok_lens_ref,
        n_mem_ref,
        mem_lens_ref,
        table_ref,
        lo_ref,
        hi_ref,
        bias_ref,
        q_ref,
        k_hbm,
        v_hbm,
        o_ref,
        k_buf,
        v_buf,
        sems,
        m_ref,
        l_ref,
        acc_ref,
        page_size=page_size,
        ppb=ppb,
        group=group,
        q_block=q_block,
        mem_entries=mem_entries,
        entries=entries,
        sm_scale=sm_scale,
        soft_cap=soft_cap,
        pv_dtype=pv_dtype,
    )


def _body(
    # scalar prefetch (SMEM)
    cu_ref,
    tok_lens_ref,
    n_mem_ref,
    mem_lens_ref,
    table_ref,
    lo_ref,
    hi_ref,
    bias_ref,
    # inputs / outputs
    q_ref,
    k_hbm,
    v_hbm,
    o_ref,
    # scratch
    k_buf,
    v_buf,
    sems,
    m_ref,
    l_ref,
    acc_ref,
    *,
    page_size,
    ppb,
    group,
    q_block,
    mem_entries,
    entries,
    sm_scale,
    soft_cap,
    pv_dtype,
):
    num_kv_heads, rows, head_dim = q_ref.shape
    cols = ppb * page_size
    blk = pl.program_id(0)
    blk_start = blk * q_block
    blk_end = blk_start + q_block
    lo, hi = lo_ref[blk], hi_ref[blk]

    def seq_plan(s):
        """(memory steps, token positions / pages this block can see, total steps) of s."""
        q_end = cu_ref[s + 1]
        mem_steps = _cdiv(n_mem_ref[s], ppb)
        # The block's last row of s sits at position tok_len - q_end + min(q_end, blk_end) - 1.
        tok_seen = tok_lens_ref[s] - q_end + jnp.minimum(q_end, blk_end)
        tok_pages = _cdiv(tok_seen, page_size)
        n = jnp.where(q_end > cu_ref[s], mem_steps + _cdiv(tok_pages, ppb), 0)
        return mem_steps, tok_seen, tok_pages, n

    def page_copies(s, i, slot):
        """[(needed, k copy, v copy)] of step i of sequence s into buffer `slot`."""
        mem_steps, _, tok_pages, _ = seq_plan(s)
        is_mem = i < mem_steps
        first = jnp.where(is_mem, i * ppb, mem_entries + (i - mem_steps) * ppb)
        limit = jnp.where(is_mem, n_mem_ref[s], mem_entries + tok_pages)
        out = []
        for j in range(ppb):
            page = table_ref[s * entries + first + j]
            out.append(
                (
                    first + j < limit,
                    pltpu.make_async_copy(k_hbm.at[page], k_buf.at[slot, j], sems.at[0, slot]),
                    pltpu.make_async_copy(v_hbm.at[page], v_buf.at[slot, j], sems.at[1, slot]),
                )
            )
        return out

    def start(s, i, slot):
        for needed, ck, cv in page_copies(s, i, slot):

            @pl.when(needed)
            def _():
                ck.start()
                cv.start()

    def wait(s, i, slot):
        for needed, ck, cv in page_copies(s, i, slot):

            @pl.when(needed)
            def _():
                ck.wait()
                cv.wait()

    def next_step(s, i):
        n = seq_plan(s)[3]
        s2 = jnp.where(i + 1 < n, s, s + 1)
        # Sequences with q_len 0 own no rows: skip them.
        # (`&` does not short-circuit: clamp so that t == hi reads nothing out of bounds.)
        empty = lambda t: (t < hi) & (seq_plan(jnp.minimum(t, hi - 1))[3] == 0)
        s2 = lax.while_loop(empty, lambda t: t + 1, s2)
        return s2, jnp.where(s2 == s, i + 1, 0)

    def columns(c, s, i):
        """(slot holds data, key position) for an int array c of column ids. Memory slots get
        a hugely negative position: every row of the sequence sees them."""
        mem_steps, tok_seen, _, _ = seq_plan(s)
        is_mem = i < mem_steps
        # Only scalar selects below: vectors are built by comparing iotas with scalars.
        mem_ok = jnp.zeros(c.shape, jnp.bool_)
        for j in range(ppb):
            e = jnp.minimum(i * ppb + j, mem_entries - 1)  # keep the SMEM read in bounds
            n_valid = jnp.where(is_mem, mem_lens_ref[s * mem_entries + e], 0)
            mem_ok |= (c >= j * page_size) & (c < j * page_size + n_valid)
        tok_start = (i - mem_steps) * cols
        # Token slots past tok_seen may be stale or never copied, even if < tok_len.
        tok_cols = jnp.where(is_mem, 0, tok_seen - tok_start)
        return mem_ok | (c < tok_cols), c + jnp.where(is_mem, -_MEM_POS, tok_start)

    def column_bias(c, s, i):
        """float32 per-column memory-page bias (0 on token steps and unused entries)."""
        is_mem = i < seq_plan(s)[0]
        out = jnp.zeros(c.shape, jnp.float32)
        for j in range(ppb):
            e = jnp.minimum(i * ppb + j, mem_entries - 1)
            b = jnp.where(is_mem, bias_ref[s * mem_entries + e], 0.0)
            out += jnp.where((c >= j * page_size) & (c < (j + 1) * page_size), b, 0.0)
        return out

    def compute(s, i, slot):
        q_start, q_end = cu_ref[s], cu_ref[s + 1]
        r0 = (jnp.maximum(q_start, blk_start) - blk_start) * group
        r1 = (jnp.minimum(q_end, blk_end) - blk_start) * group
        base = tok_lens_ref[s] - q_end + blk_start  # position of row r is base + r // group
        r = lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
        col_ok, key_pos = columns(lax.broadcasted_iota(jnp.int32, (rows, cols), 1), s, i)
        # key_pos <= base + r // group  <=>  (key_pos - base) * group <= r
        vis = col_ok & (r >= r0) & (r < r1) & ((key_pos - base) * group <= r)
        v_ok, _ = columns(lax.broadcasted_iota(jnp.int32, (cols, head_dim), 0), s, i)
        bias = None if bias_ref is None else column_bias(lax.broadcasted_iota(jnp.int32, (1, cols), 1), s, i)
        for h in range(num_kv_heads):
            q = q_ref[h]
            k = k_buf[slot, :, :, h, :].reshape(cols, head_dim)
            v = v_buf[slot, :, :, h, :].reshape(cols, head_dim)
            qk_dtype = jnp.promote_types(q.dtype, k.dtype)
            logits = (
                lax.dot_general(
                    q.astype(qk_dtype),
                    k.astype(qk_dtype),
                    (((1,), (1,)), ((), ())),
                    precision=_precision(qk_dtype),
                    preferred_element_type=jnp.float32,
                )
                * sm_scale
            )
            if soft_cap is not None:
                logits = soft_cap * jnp.tanh(logits / soft_cap)
            if bias is not None:
                logits = logits + bias
            logits = jnp.where(vis, logits, -jnp.inf)
            m_prev = m_ref[h][:, :1]
            m_new = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw nothing yet
            alpha = jnp.exp(m_prev - m_safe)
            p = jnp.where(vis, jnp.exp(logits - m_safe), 0.0)
            l_ref[h] = jnp.broadcast_to(alpha * l_ref[h][:, :1] + p.sum(1, keepdims=True), (rows, _LANES))
            m_ref[h] = jnp.broadcast_to(m_new, (rows, _LANES))
            # Stale or never-copied buffer slots may hold NaN; 0 * NaN would leak through.
            v = jnp.where(v_ok, v.astype(pv_dtype), 0)
            acc_ref[h] = alpha * acc_ref[h] + jnp.dot(
                p.astype(pv_dtype), v, precision=_precision(pv_dtype), preferred_element_type=jnp.float32
            )

    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(lo < hi)
    def _():
        start(lo, 0, 0)

        def body(state):
            s, i, slot = state
            s2, i2 = next_step(s, i)

            @pl.when(s2 < hi)
            def _():
                start(s2, i2, 1 - slot)

            wait(s, i, slot)
            compute(s, i, slot)
            return s2, i2, 1 - slot

        lax.while_loop(lambda st: st[0] < hi, body, (lo, jnp.int32(0), jnp.int32(0)))

    for h in range(num_kv_heads):
        l = l_ref[h][:, :1]
        o_ref[h] = (acc_ref[h] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def _default_q_block(num_tokens: int, num_seqs: int, group: int) -> int:
    # Rows per block (q_block * group) stay a multiple of 16 (bf16 sublane packing).
    unit = 16 // math.gcd(16, group)
    if num_tokens <= num_seqs:  # decode-shaped batch: rows of other sequences are waste
        return unit
    return max(unit, 128 // group // unit * unit)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "soft_cap", "interpret", "q_block", "pages_per_block", "pv_in_kv_dtype"),
)
def hybrid_paged_attention_tpu(
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
    interpret: bool | pltpu.InterpretParams = False,
    q_block: int | None = None,
    pages_per_block: int | None = None,
    pv_in_kv_dtype: bool = False,
    mem_page_bias: jax.Array | None = None,
) -> jax.Array:
    """Arguments as for `hybrid_paged_attention` (dispatch.py), plus tuning knobs.
    q_block: query tokens per program; pages_per_block: pages per KV step; pv_in_kv_dtype:
    feed the softmax weights to the PV matmul in the K/V dtype (faster on the MXU for bf16,
    weights rounded to bf16) instead of float32; interpret: True or pltpu.InterpretParams
    runs the TPU interpreter (CPU)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    num_seqs = tok_lens.shape[0]
    group = num_q_heads // num_kv_heads
    qb = q_block or _default_q_block(num_tokens, num_seqs, group)
    max_pages = max(mem_page_table.shape[1], tok_page_table.shape[1])
    ppb = pages_per_block or max(1, min(max(1, 256 // page_size), max_pages))
    num_blocks = _cdiv(num_tokens, qb)
    rows = qb * group

    mem_ids, tok_ids = safe_page_tables(mem_page_table, mem_page_lens, tok_page_table, tok_lens, num_pages, page_size)
    # Whole steps of ppb entries, and at least one step even for a zero-width memory table.
    pad_to = lambda x, n: jnp.pad(x, ((0, 0), (0, max(1, _cdiv(x.shape[1], n)) * n - x.shape[1])))
    mem_ids, mem_lens, tok_ids = pad_to(mem_ids, ppb), pad_to(mem_page_lens, ppb), pad_to(tok_ids, ppb)
    mem_entries = mem_ids.shape[1]
    entry = jnp.arange(mem_entries, dtype=jnp.int32)
    # Entries after the last used one are never fetched; holes before it are masked.
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
    qp = qp.reshape(num_blocks, num_kv_heads, rows, head_dim)
    blk_spec = pl.BlockSpec((None, num_kv_heads, rows, head_dim), lambda b, *_: (b, 0, 0, 0))
    kernel = functools.partial(
        _kernel,
        page_size=page_size,
        ppb=ppb,
        group=group,
        q_block=qb,
        mem_entries=mem_entries,
        entries=table.shape[1],
        sm_scale=head_dim**-0.5 if sm_scale is None else sm_scale,
        soft_cap=soft_cap,
        pv_dtype=k_pages.dtype if pv_in_kv_dtype else jnp.float32,
        has_bias=mem_page_bias is not None,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),
            grid=(num_blocks,),
            in_specs=[blk_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=blk_spec,
            scratch_shapes=[
                pltpu.VMEM((2, ppb, page_size, num_kv_heads, head_dim), k_pages.dtype),
                pltpu.VMEM((2, ppb, page_size, num_kv_heads, head_dim), v_pages.dtype),
                pltpu.SemaphoreType.DMA((2, 2)),
                pltpu.VMEM((num_kv_heads, rows, _LANES), jnp.float32),
                pltpu.VMEM((num_kv_heads, rows, _LANES), jnp.float32),
                pltpu.VMEM((num_kv_heads, rows, head_dim), jnp.float32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        # True means the TPU interpreter (DMAs, semaphores), not the generic one.
        interpret=pltpu.InterpretParams() if interpret is True else interpret,
        name="hybrid_paged_attention",
    )(*scalars, qp, k_pages, v_pages)
    out = out.reshape(num_blocks, num_kv_heads, qb, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(num_blocks * qb, num_q_heads, head_dim)[:num_tokens]
