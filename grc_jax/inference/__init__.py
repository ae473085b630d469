"""Serving: paged KV pool, the jitted decode loop, the memory bank and the Engine."""

from grc_jax.inference.decoder import Decoder, DecodeSettings
from grc_jax.inference.engine import Engine, Hit, RagAnswer
from grc_jax.inference.loop import DecodeState, LoopSettings
from grc_jax.inference.memory_bank import BankSpec, MemoryBank
from grc_jax.inference.pages import KVPool, OutOfPages, PageAllocator
from grc_jax.inference.sampling import GREEDY, Sampling

__all__ = [
    "GREEDY",
    "BankSpec",
    "DecodeSettings",
    "DecodeState",
    "Decoder",
    "Engine",
    "Hit",
    "KVPool",
    "LoopSettings",
    "MemoryBank",
    "OutOfPages",
    "PageAllocator",
    "RagAnswer",
    "Sampling",
]
