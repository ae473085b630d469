"""Hybrid paged attention: one kernel call over a ragged batch of memory pages + token pages.

See `hybrid_paged_attention` for the signature shared by all implementations.
"""

from .dispatch import hybrid_paged_attention
from .gpu import hybrid_paged_attention_gpu
from .reference import hybrid_paged_attention_reference
from .tpu import hybrid_paged_attention_tpu

__all__ = [
    "hybrid_paged_attention",
    "hybrid_paged_attention_gpu",
    "hybrid_paged_attention_reference",
    "hybrid_paged_attention_tpu",
]
