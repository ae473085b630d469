"""Serving: paged KV pool, the jitted decode loop, the memory bank and the Engine."""
from grc_jax.inference.decode import GREEDY, DecodeSettings, DecodeState, Decoder, Sampling
from grc_jax.inference.engine import Engine, Hit, RagAnswer
from grc_jax.inference.memory_bank import BankSpec, MemoryBank
from grc_jax.inference.pages import KVPool, OutOfPages, PageAllocator

__all__ = ["GREEDY", "BankSpec", "DecodeSettings", "DecodeState", "Decoder", "Engine", "Hit", "KVPool", "MemoryBank",
           "OutOfPages", "PageAllocator", "RagAnswer", "Sampling"]
