"""Serving: paged KV pool, the jitted decode loop, the memory bank and the Engine."""
from grc_jax.inference.decode import GREEDY, DecodeSettings, DecodeState, Decoder, Sampling
from grc_jax.inference.pages import KVPool, OutOfPages, PageAllocator

__all__ = ["GREEDY", "DecodeSettings", "DecodeState", "Decoder", "KVPool", "OutOfPages", "PageAllocator", "Sampling"]
