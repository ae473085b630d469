"""Backend choice for hybrid paged attention."""

from __future__ import annotations

from typing import Any

import jax

from .gpu import hybrid_paged_attention_gpu
from .reference import hybrid_paged_attention_reference
from .tpu import hybrid_paged_attention_tpu

IMPLS = {
    "reference": hybrid_paged_attention_reference,
    "tpu": hybrid_paged_attention_tpu,
    "gpu": hybrid_paged_attention_gpu,
}


def default_impl() -> str:
    return {"tpu": "tpu", "gpu": "gpu"}.get(jax.default_backend(), "reference")


def hybrid_paged_attention(
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
    impl: str | None = None,
    **kernel_options: Any,
) -> jax.Array:
    """Attention of a ragged batch over memory pages (fully visible) and token pages (causal).

    q: [num_tokens, num_q_heads, head_dim], the new tokens of all sequences concatenated;
    k_pages, v_pages: [num_pages, page_size, num_kv_heads, head_dim], one pool for both kinds;
    cu_q_lens: int32[num_seqs + 1], sequence s owns rows cu_q_lens[s]:cu_q_lens[s+1] (rows
    past cu_q_lens[-1] are padding and come back as zeros);
    mem_page_table / mem_page_lens: int32[num_seqs, max_mem_pages], memory page ids and the
    valid slots of each (0 = unused entry);
    tok_page_table: int32[num_seqs, max_tok_pages]; tok_lens: int32[num_seqs], tokens in the
    token pages including this call's (already written) new tokens.
    mem_page_bias: optional float32[num_seqs, max_mem_pages], one scalar per memory page
    entry, added to the logits of every slot of that page before the softmax (memory priors,
    docs/design.md section 8); entries with mem_page_lens 0 are never used. None: no bias.
    Query i of sequence s sits at position tok_lens[s] - q_len_s + i and sees all valid memory
    slots plus token slots 0..position, under one float32 softmax; GQA maps q head h to kv head
    h // (num_q_heads // num_kv_heads). Returns [num_tokens, num_q_heads, head_dim] in q.dtype.

    impl: None picks by jax.default_backend() (tpu, gpu, else "reference"). kernel_options
    (interpret, q_block, pages_per_block, ...) go to the Pallas implementations only.
    """
    name = impl or default_impl()
    if name not in IMPLS:
        raise ValueError(f"impl must be one of {sorted(IMPLS)}, got {impl!r}")
    if name == "reference" and kernel_options:
        raise TypeError(f"the reference takes no kernel options, got {sorted(kernel_options)}")
    check_shapes(q, k_pages, v_pages, cu_q_lens, mem_page_table, mem_page_lens, tok_page_table, tok_lens, mem_page_bias)
    bias = {} if mem_page_bias is None else {"mem_page_bias": mem_page_bias}  # None: the call of old
    return IMPLS[name](
        q,
        k_pages,
        v_pages,
        cu_q_lens,
        mem_page_table,
        mem_page_lens,
        tok_page_table,
        tok_lens,
        sm_scale=sm_scale,
        soft_cap=soft_cap,
        **bias,
        **kernel_options,
    )


def check_shapes(
    q, k_pages, v_pages, cu_q_lens, mem_page_table, mem_page_lens, tok_page_table, tok_lens, mem_page_bias=None
) -> None:
    """Raises ValueError naming the argument whose shape does not fit the others (shapes are
    static, so this also runs under jit; page ids and lengths are values and are not checked)."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"hybrid_paged_attention: {message}")

    need(q.ndim == 3, f"q must be [num_tokens, num_q_heads, head_dim], got shape {list(q.shape)}")
    need(
        k_pages.ndim == 4, f"k_pages must be [num_pages, page_size, num_kv_heads, head_dim], got {list(k_pages.shape)}"
    )
    need(v_pages.shape == k_pages.shape, f"v_pages has shape {list(v_pages.shape)}, k_pages {list(k_pages.shape)}")
    need(q.shape[2] == k_pages.shape[3], f"q's head_dim {q.shape[2]} differs from k_pages' {k_pages.shape[3]}")
    need(
        q.shape[1] % k_pages.shape[2] == 0,
        f"q's {q.shape[1]} heads are not a multiple of k_pages' {k_pages.shape[2]} kv heads",
    )
    need(
        cu_q_lens.ndim == 1 and cu_q_lens.shape[0] >= 2,
        f"cu_q_lens must be [num_seqs + 1] with num_seqs >= 1, got shape {list(cu_q_lens.shape)}",
    )
    num_seqs = cu_q_lens.shape[0] - 1
    for name, table in (
        ("mem_page_table", mem_page_table),
        ("mem_page_lens", mem_page_lens),
        ("tok_page_table", tok_page_table),
    ):
        need(
            table.ndim == 2 and table.shape[0] == num_seqs,
            f"{name} must be [num_seqs={num_seqs}, pages] (num_seqs from cu_q_lens), got shape {list(table.shape)}",
        )
    need(
        mem_page_lens.shape == mem_page_table.shape,
        f"mem_page_lens has shape {list(mem_page_lens.shape)}, mem_page_table {list(mem_page_table.shape)}",
    )
    need(tok_lens.shape == (num_seqs,), f"tok_lens must be [num_seqs={num_seqs}], got shape {list(tok_lens.shape)}")
    if mem_page_bias is not None:
        need(
            mem_page_bias.shape == mem_page_table.shape,
            f"mem_page_bias must be [num_seqs, max_mem_pages]={list(mem_page_table.shape)} like mem_page_table, "
            f"got shape {list(mem_page_bias.shape)}",
        )
