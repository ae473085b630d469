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
    return IMPLS[name](
        q, k_pages, v_pages, cu_q_lens, mem_page_table, mem_page_lens, tok_page_table, tok_lens,
        sm_scale=sm_scale, soft_cap=soft_cap, **kernel_options)
