"""Weight-only int8 serving: int8 weights with one float32 scale per output channel.

`quantize_params` turns a float parameter tree into one whose dense weights (q/k/v/o, gate/up/
down and the LM head; with tied embeddings the head is a quantized copy of the embedding, whose
float rows stay for the exact lookup) are `Int8Weight`s; `model.dense` multiplies by either
kind. Norms, biases, the embedding lookup and the embedding head stay float.

How it multiplies: XLA:CPU has no fast mixed or integer matrix product (a dot with an int8
operand, a convert fused into it, or int8 x int8 -> int32 runs 11-30x slower than the float32
dot; benchmarks/RESULTS.md). So on a CPU a product of a few rows (decode: one row per sequence,
up to `MATVEC_ROWS`) goes to a native kernel through XLA's FFI
(grc_jax/cpu_kernels/int8_matvec.cc), which streams the int8 bytes once; where that kernel
cannot be built (no C++ compiler), batch 1 falls back to a multiply and row sum over the int8
weight, which XLA hands to YNNPACK's reduction. Larger products (prefill) and other backends
dequantize the weight and use the float dot.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from grc_jax.cpu_kernels import int8_matvec

# name -> how many leading axes of the float weight are input axes (the rest are outputs)
LAYER_WEIGHTS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}


@flax.struct.dataclass
class Int8Weight:
    """A float weight [in..., out...] as int8 q [..., out, in] (inputs flattened, transposed so
    a row sum reads contiguous bytes) and float32 scale [..., out]; w ~= q.T * scale. Leading
    axes (the stacked layers) are carried along, so `unstack_layers` and `lax.scan` slice it."""

    q: jax.Array
    scale: jax.Array
    out_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The float weight [..., in, out...] (inputs flattened)."""
        w = jnp.swapaxes(self.q.astype(jnp.float32) * self.scale[..., None], -1, -2)
        return w.reshape(*w.shape[:-1], *self.out_shape).astype(dtype)


def quantize(w: jax.Array, contract: int = 1) -> Int8Weight:
    """Symmetric per-output-channel int8 of w [in..., out...] (`contract` input axes)."""
    w = jnp.asarray(w, jnp.float32)
    in_size = math.prod(w.shape[:contract])
    out_shape = tuple(w.shape[contract:])
    w2 = w.reshape(in_size, -1).T  # [out, in]
    scale = jnp.max(jnp.abs(w2), axis=1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel: q = 0, any scale works
    q = jnp.clip(jnp.round(w2 / safe[:, None]), -127, 127).astype(jnp.int8)
    return Int8Weight(q, scale, out_shape)


def quantize_params(params: dict[str, Any], tie_word_embeddings: bool) -> dict[str, Any]:
    """The parameters with every dense weight int8 (stacked layer weights quantized per layer).

    The head becomes `lm_head` (an Int8Weight over [hidden, vocab]); with tied embeddings the
    float `embed` stays for the lookup, so the tree holds both."""
    # The native kernel registers with XLA here, before a decode program calling it is compiled
    # or read back from the compilation cache (grc_jax/compile_cache.py).
    int8_matvec.available()
    out = dict(params)
    layers = dict(params["layers"])
    for name, contract in LAYER_WEIGHTS.items():
        out_shape = tuple(layers[name].shape[1 + contract :])
        per_layer = jax.vmap(lambda w, c=contract: quantize(w, c))
        stacked = per_layer(layers[name])
        layers[name] = Int8Weight(stacked.q, stacked.scale, out_shape)
    out["layers"] = layers
    head = params["embed"].T if tie_word_embeddings else params["lm_head"]
    out["lm_head"] = quantize(head, 1)
    return out


def is_quantized(params: dict[str, Any]) -> bool:
    return any(
        isinstance(leaf, Int8Weight) for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Weight))
    )


MATVEC_ROWS = 16  # products of up to this many rows use the native CPU kernel


def int8_dense(x: jax.Array, w: Int8Weight, contract: int, dtype: Any) -> jax.Array:
    """x [..., in...] (the last `contract` axes are inputs) times the weight -> [..., out...]."""
    lead = x.shape[: x.ndim - contract]
    rows = math.prod(lead)
    x2 = x.reshape(rows, -1).astype(jnp.float32)

    def xla(x2: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
        if rows == 1:
            # Multiply-and-row-sum: fused by XLA:CPU into one YNNPACK reduction over the int8 bytes.
            return jnp.sum(x2[0][None, :] * q.astype(jnp.float32), axis=1)[None] * scale
        return int8_matvec.reference(x2, q, scale)  # the weight dequantized, a float dot

    if rows <= MATVEC_ROWS and int8_matvec.available():
        y = jax.lax.platform_dependent(x2, w.q, w.scale, cpu=int8_matvec.int8_matvec, default=xla)
    else:
        y = xla(x2, w.q, w.scale)
    return y.reshape(*lead, *w.out_shape).astype(dtype)


def weight_bytes(params: dict[str, Any]) -> int:
    """Bytes of every array in the tree (an int8 serving tree counts its int8 and scales)."""
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(params)))
