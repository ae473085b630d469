"""Weight-only int8 serving: int8 weights with one float32 scale per output channel.

`quantize_params` turns a float parameter tree into one whose dense weights (q/k/v/o, gate/up/
down and the LM head; with tied embeddings the head is a quantized copy of the embedding, whose
float rows stay for the exact lookup) are `Int8Weight`s; `model.dense` multiplies by either
kind. Norms, biases, the embedding lookup and the embedding head stay float.

Why the matmul is written the way it is (XLA:CPU, jax 0.10.2, `benchmarks/decode_bench.py`):
XLA:CPU has no fast mixed or integer matrix product: a dot with an int8 operand, with a convert
fused into it, or int8 x int8 -> int32 runs 15-30x slower than the float32 dot. A batch-1
product is therefore written as an elementwise multiply and a row sum (`x * convert(q)` summed
over the input axis), which XLA hands to YNNPACK's reduction and which reads the int8 bytes;
larger batches (prefill, batch > 1) dequantize the weight and use the float dot. Even so, XLA
materializes the broadcast activation as a float32 matrix of the weight's shape, and on
SmolLM2-135M batch-1 decode ran 5x slower than float32 (benchmarks/RESULTS.md): on this backend
the switch saves memory, not time.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

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


def int8_dense(x: jax.Array, w: Int8Weight, contract: int, dtype: Any) -> jax.Array:
    """x [..., in...] (the last `contract` axes are inputs) times the weight -> [..., out...]."""
    lead = x.shape[: x.ndim - contract]
    rows = math.prod(lead)
    x2 = x.reshape(rows, -1).astype(jnp.float32)
    if rows == 1:
        # Multiply-and-row-sum: fused by XLA:CPU into one YNNPACK reduction over the int8 bytes.
        y = jnp.sum(x2[0][None, :] * w.q.astype(jnp.float32), axis=1)[None]
    else:
        y = jax.lax.dot_general(x2, w.q.astype(jnp.float32), (((1,), (1,)), ((), ())))
    y = y * w.scale
    return y.reshape(*lead, *w.out_shape).astype(dtype)


def weight_bytes(params: dict[str, Any]) -> int:
    """Bytes of every array in the tree (an int8 serving tree counts its int8 and scales)."""
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(params)))
