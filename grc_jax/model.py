"""The Llama-family decoder (Llama 2/3, Qwen2/2.5, Qwen3) with GRC's meta latent tokens.

The public surface is functional: `init_params` returns a plain pytree (declared by a Linen
module, which gives each parameter its initializer and logical axes) and `forward(config,
params, tokens, meta)` runs it. Layer parameters are always stacked on a leading `layers` axis.
`run_layers` is the one loop over the layers, with the attention passed in as a function: a
dense mask in `forward` (training), the paged pool in `grc_jax.inference.loop`, recorded
probabilities in experiments/.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grc_jax.config import DTYPES, ModelConfig
from grc_jax.layout import LATENT, READER, TokenMeta, attention_mask, causal_mask, positions

Params = dict[str, Any]


class ForwardOutput(NamedTuple):
    logits: jax.Array | None  # [batch, length, total_vocab] (float32)
    hidden: jax.Array  # [batch, length, hidden]: final, post-norm
    keys: jax.Array | None  # [layers, batch, n, kv_heads, head_dim] at `kv_index` (rotated)
    values: jax.Array | None  # same


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies, with `linear` or `llama3` scaling applied as transformers does."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling_dict or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_cos_sin(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [..., head_dim] for integer positions, in the compute dtype."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(config))
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    dtype = DTYPES[config.dtype]
    return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates [batch, length, heads, head_dim] by the half-split convention of HF Llama."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def dense(x: jax.Array, w: Any, dtype: Any, contract: int = 1, matmul_dtype: str = "float32") -> jax.Array:
    """x [..., in...] times w [in...,  out...] over x's last `contract` axes; w is a float array or
    a `grc_jax.quantize.Int8Weight` (weight-only int8 serving), which multiplies its own way.
    matmul_dtype "bfloat16": `bf16_product`, the result cast to `dtype`."""
    if hasattr(w, "out_shape"):
        from grc_jax.quantize import int8_dense

        return int8_dense(x, w, contract, dtype)
    if matmul_dtype == "bfloat16":
        return bf16_product(x, w, contract, False).astype(dtype)
    return jnp.tensordot(x, w.astype(dtype), axes=contract)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def bf16_product(x: jax.Array, w: jax.Array, contract: int, w_transposed: bool) -> jax.Array:
    """float32 x . w from bfloat16-rounded x and w, summed in float32: x's last `contract` axes
    against w [in..., out...]'s first, or, w_transposed, x's last axis against w [out, in]'s last
    (a tied embedding as the output head). The gradients round their operands the same way.

    Why a custom gradient: JAX's own would multiply a float32 cotangent by a bfloat16 operand,
    which XLA:CPU runs in float32, at float32's speed. Each product here keeps the operands' own
    layouts and returns its result untransposed: XLA:CPU multiplies bfloat16 by bfloat16 into
    float32 only in its YNNPACK fusions, and a transposed result falls back to a dot it lacks for
    those types."""
    bf16 = jnp.bfloat16
    axes = ((x.ndim - 1,), (1,)) if w_transposed else contract
    return jnp.tensordot(x.astype(bf16), w.astype(bf16), axes=axes, preferred_element_type=jnp.float32)


def _bf16_product_fwd(x, w, contract, w_transposed):
    # The zero scalars carry x's and w's dtypes (a residual must be an array), for their cotangents.
    dtypes = (jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))
    return bf16_product(x, w, contract, w_transposed), (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), dtypes)


def _bf16_product_bwd(contract, w_transposed, residuals, g):
    x, w, (x_zero, w_zero) = residuals
    g = g.astype(jnp.bfloat16)
    lead = tuple(range(x.ndim - (1 if w_transposed else contract)))
    f32 = jnp.float32
    if w_transposed:  # w [out, in], g [lead..., out]
        dx = jnp.tensordot(g, w, axes=((g.ndim - 1,), (0,)), preferred_element_type=f32)
        dw = jnp.tensordot(g, x, axes=(lead, lead), preferred_element_type=f32)
    else:  # w [in..., out...], g [lead..., out...]
        out = w.ndim - contract
        dx = jnp.tensordot(
            g, w, axes=(tuple(range(g.ndim - out, g.ndim)), tuple(range(contract, w.ndim))), preferred_element_type=f32
        )
        dw = jnp.tensordot(x, g, axes=(lead, lead), preferred_element_type=f32)
    return dx.astype(x_zero.dtype), dw.astype(w_zero.dtype)


bf16_product.defvjp(_bf16_product_fwd, _bf16_product_bwd)


def layer_param_specs(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], Any]]:
    """name -> (logical axes, shape, initializer) of one decoder layer's parameters."""
    c = config
    D, H, KV, Dh, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    ones, zeros, normal = nn.initializers.ones, nn.initializers.zeros, nn.initializers.normal(c.initializer_range)
    specs = {
        "input_norm": (("norm",), (D,), ones),
        "q_proj": (("embed", "q_heads", "head_dim"), (D, H, Dh), normal),
        "k_proj": (("embed", "kv_heads", "head_dim"), (D, KV, Dh), normal),
        "v_proj": (("embed", "kv_heads", "head_dim"), (D, KV, Dh), normal),
        "o_proj": (("q_heads", "head_dim", "embed"), (H, Dh, D), normal),
        "post_attention_norm": (("norm",), (D,), ones),
        "gate_proj": (("embed", "mlp"), (D, F), normal),
        "up_proj": (("embed", "mlp"), (D, F), normal),
        "down_proj": (("mlp", "embed"), (F, D), normal),
    }
    if c.qkv_bias:
        specs.update(
            q_bias=(("q_heads", "head_dim"), (H, Dh), zeros),
            k_bias=(("kv_heads", "head_dim"), (KV, Dh), zeros),
            v_bias=(("kv_heads", "head_dim"), (KV, Dh), zeros),
        )
    if c.qk_norm:
        specs.update(q_norm=(("norm",), (Dh,), ones), k_norm=(("norm",), (Dh,), ones))
    return specs


def attention_inputs(config: ModelConfig, p: Params, x: jax.Array, cos: jax.Array, sin: jax.Array):
    """One layer's rotated q [b,t,h,d] and k, v [b,t,kv,d] from its input x [b,t,D]."""
    c = config
    dtype = DTYPES[c.dtype]
    h = rms_norm(x, p["input_norm"], c.rms_norm_eps)
    q, k, v = (dense(h, p[f"{n}_proj"], dtype, matmul_dtype=c.matmul_dtype) for n in "qkv")
    if c.qkv_bias:
        q, k, v = (a + p[f"{n}_bias"].astype(dtype) for a, n in zip((q, k, v), "qkv"))
    if c.qk_norm:
        q = rms_norm(q, p["q_norm"], c.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], c.rms_norm_eps)
    q = nn.with_logical_constraint(
        apply_rope(q, cos, sin), ("activation_batch", "activation_length", "activation_q_heads", "head_dim")
    )
    k = nn.with_logical_constraint(
        apply_rope(k, cos, sin), ("activation_batch", "activation_length", "activation_kv_heads", "head_dim")
    )
    return q, k, v


def layer_output(config: ModelConfig, p: Params, x: jax.Array, attention: jax.Array) -> jax.Array:
    """The residual stream after one layer, given its attention output [b,t,h,d]."""
    c = config
    dtype = DTYPES[c.dtype]
    x = x + dense(attention, p["o_proj"], dtype, contract=2, matmul_dtype=c.matmul_dtype)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    h = rms_norm(x, p["post_attention_norm"], c.rms_norm_eps)
    gate = dense(h, p["gate_proj"], dtype, matmul_dtype=c.matmul_dtype)
    up = dense(h, p["up_proj"], dtype, matmul_dtype=c.matmul_dtype)
    act = nn.with_logical_constraint(
        jax.nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp")
    )
    x = x + dense(act, p["down_proj"], dtype, matmul_dtype=c.matmul_dtype)
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Masked GQA attention. q [b,t,h,d], k/v [b,s,kv,d], mask bool [b,t,s] -> [b,t,h,d];
    bias (float [b,t,s], optional) is added to the logits of every head (memory priors).

    jax.nn.dot_product_attention with its default (XLA) implementation: softmax in float32, and
    about 25% faster than a hand-written einsum on the CPU. Its cuDNN path would need the GRC mask
    as a bias, so it is not used."""
    if bias is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    return jax.nn.dot_product_attention(q, k, v, bias=bias[:, None].astype(q.dtype), mask=mask[:, None])


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

# attention(layer, q, k, v, carry) -> (output [b,t,h,d], carry, this layer's result). `layer` is
# the layer's index (traced in a scan); `carry` is whatever the caller threads through the layers
# (the paged K/V pool in decode); the results of all layers come back stacked on a leading axis.
Attention = Callable[[Any, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any, Any]]


def run_layers(
    config: ModelConfig,
    layers: Any,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    attention: Attention,
    carry: Any = None,
    *,
    remat: bool = False,
) -> tuple[jax.Array, Any, Any]:
    """The decoder layers over x [b,t,D]: the one layer loop of training, decode and inspection,
    which differ only in `attention`. Returns (x after the last layer, the final carry, the
    layers' results stacked).

    layers: the stacked layer parameters (leading `layers` axis), run in a `lax.scan`, unrolled
    when `config.scan_layers` is false; or a tuple of per-layer trees (`unstack_layers`), run as a
    Python loop over separate arrays. remat: rematerialise each layer in the backward pass as
    `config.remat_policy` says ("none": not at all); `forward` asks for it, decode does not.
    """

    def layer(state: tuple[jax.Array, Any], xs: tuple[Params, Any]) -> tuple[tuple[jax.Array, Any], Any]:
        x, carry = state
        p, index = xs
        q, k, v = attention_inputs(config, p, x, cos, sin)
        out, carry, result = attention(index, q, k, v, carry)
        return (layer_output(config, p, x, out), carry), result

    if remat and config.remat_policy != "none":
        # prevent_cse only outside a scan, which already keeps XLA from merging the recomputation.
        layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[config.remat_policy], prevent_cse=not config.scan_layers)
    if isinstance(layers, tuple):
        results = []
        for index, p in enumerate(layers):
            (x, carry), result = layer((x, carry), (p, index))
            results.append(result)
        return x, carry, jax.tree.map(lambda *a: jnp.stack(a), *results)
    count = jax.tree.leaves(layers)[0].shape[0]
    (x, carry), results = jax.lax.scan(
        layer, (x, carry), (layers, jnp.arange(count, dtype=jnp.int32)), unroll=1 if config.scan_layers else count
    )
    return x, carry, results


def masked_attention(mask: jax.Array, bias: jax.Array | None = None, kv_index: jax.Array | None = None) -> Attention:
    """Training's attention: `attend` under a dense mask [b,t,s]; each layer's result is its
    rotated K/V at the row positions kv_index [b, n] (None: no result)."""
    take = jax.vmap(lambda a, i: a[i])

    def attention(layer: Any, q: jax.Array, k: jax.Array, v: jax.Array, carry: Any) -> tuple[jax.Array, Any, Any]:
        kv = None if kv_index is None else (take(k, kv_index), take(v, kv_index))
        return attend(q, k, v, mask, bias), carry, kv

    return attention


def unstack_layers(params: Params) -> Params:
    """The parameters with `layers` as a tuple of per-layer trees, which `run_layers` runs as an
    unrolled Python loop over separate arrays (the decode loop's choice on the CPU,
    `grc_jax.inference.strategy`)."""
    return {**params, "layers": _unstack(params["layers"])}


@jax.jit
def _unstack(layers: Any) -> tuple[Any, ...]:
    # One program for every slice: eagerly, each layer's slice of each weight is a dispatch.
    count = jax.tree.leaves(layers)[0].shape[0]
    return tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(count))


def lm_logits(config: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """float32 next-token logits over the whole vocabulary (meta latent rows included)."""
    head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    if hasattr(params.get("lm_head"), "out_shape"):  # int8 serving: a quantized head, tied or not
        return dense(hidden, params["lm_head"], jnp.float32)
    if config.matmul_dtype == "bfloat16":
        tied = config.tie_word_embeddings
        return bf16_product(hidden, params["embed"] if tied else params["lm_head"], 1, tied)
    return jnp.matmul(hidden, head.astype(DTYPES[config.dtype]), preferred_element_type=jnp.float32)


def embed_tokens(config: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """The input embeddings [b, t, D] in the compute dtype."""
    x = jnp.take(params["embed"], tokens, axis=0).astype(DTYPES[config.dtype])
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))


def _param(module: nn.Module, name: str, axes: tuple[str, ...], shape: tuple[int, ...], init: Any = None):
    init = init or nn.initializers.normal(module.config.initializer_range)
    dtype = DTYPES[module.config.param_dtype]
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class _LayerParams(nn.Module):
    """One decoder layer's parameters; `_Params` stacks them with `nn.scan` over the layers."""

    config: ModelConfig

    @nn.compact
    def __call__(self, carry: None) -> tuple[None, None]:
        for name, (axes, shape, init) in layer_param_specs(self.config).items():
            _param(self, name, axes, shape, init)
        return carry, None


class _Params(nn.Module):
    """Declares every parameter: its place in the tree, shape, initializer and logical axes.

    Only `init` runs it (`init_params`, `param_shapes`, `param_logical_axes`); `forward` computes
    with the plain tree. The layers are declared through `nn.scan`, which stacks them on a
    leading axis named "layers" and gives each layer its own initializer key."""

    config: ModelConfig

    @nn.compact
    def __call__(self) -> None:
        c = self.config
        _param(self, "embed", ("vocab", "embed"), (c.total_vocab_size, c.hidden_size))
        layers = nn.scan(
            _LayerParams,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        layers(c, name="layers")(None)
        _param(self, "final_norm", ("norm",), (c.hidden_size,), nn.initializers.ones)
        if not c.tie_word_embeddings:
            _param(self, "lm_head", ("embed", "vocab"), (c.hidden_size, c.total_vocab_size))
        if c.embed_dim is not None:
            _param(self, "embed_head", ("embed", "embed_out"), (c.hidden_size, c.embed_dim))


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters, the meta latent rows included.

    The mean initialisation of `init_latent_rows` is for latents added to a trained model: over
    random embeddings the mean is a near-zero vector, and K identical latents learn to differ
    only slowly (on the demo world, answering from memory stayed at chance for 600 steps)."""
    return nn.unbox(_Params(config).init(rng)["params"])


def init_latent_rows(config: ModelConfig, params: Params) -> Params:
    """Sets the meta latent rows of the embedding (and untied head) to the base rows' mean."""
    params = dict(params)
    base = config.vocab_size
    embed = params["embed"]
    params["embed"] = embed.at[base:].set(jnp.mean(embed[:base], axis=0).astype(embed.dtype))
    if "lm_head" in params:
        head = params["lm_head"]
        params["lm_head"] = head.at[:, base:].set(jnp.mean(head[:, :base], axis=1, keepdims=True).astype(head.dtype))
    return params


def _boxed_shapes(config: ModelConfig) -> Any:
    return jax.eval_shape(lambda: _Params(config).init(jax.random.key(0)))["params"]


def param_shapes(config: ModelConfig) -> Any:
    """The parameters' shapes and dtypes, as a pytree of ShapeDtypeStructs (no allocation)."""
    return nn.unbox(_boxed_shapes(config))


def param_logical_axes(config: ModelConfig) -> Any:
    """The logical axis names of every parameter, as a pytree of PartitionSpecs."""
    return nn.get_partition_spec(_boxed_shapes(config))


def forward(
    config: ModelConfig,
    params: Params,
    tokens: jax.Array,
    meta: TokenMeta | None = None,
    *,
    valid: jax.Array | None = None,
    kv_index: jax.Array | None = None,
    compute_logits: bool = True,
    memory_bias: jax.Array | None = None,
) -> ForwardOutput:
    """Runs the model over `tokens` [batch, length].

    meta=None: a plain causal LM; `valid` (bool [batch, length], default all true) marks the
    real tokens, whose positions count 0, 1, ... from the first real one, as transformers does.
    With meta: the GRC attention rule and positions of `grc_jax.layout`.
    kv_index (int32 [batch, n]): also return every layer's rotated K/V at those row positions.
    memory_bias (float32 [batch, length], with meta only): added to every READER's attention
    logits on each LATENT key, per key (memory priors, `grc_jax.priors`); None: no bias at all.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    if meta is None:
        valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
        if valid.shape != tokens.shape:
            raise ValueError(f"valid has shape {valid.shape}, tokens {tokens.shape}")
        pos = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)
        mask = causal_mask(valid)
    else:
        if valid is not None:
            raise ValueError("with meta, mark padding as meta.example == 0, not with valid=")
        for name, array in zip(TokenMeta._fields, meta):
            if jnp.shape(array) != tokens.shape:
                raise ValueError(f"meta.{name} has shape {jnp.shape(array)}, tokens {tokens.shape}")
        pos = positions(meta, config.max_segment_len, config.num_latents)
        mask = attention_mask(meta)
    bias = None
    if memory_bias is not None:
        if meta is None or jnp.shape(memory_bias) != tokens.shape:
            raise ValueError(
                f"memory_bias must be [batch, length]={list(tokens.shape)} with meta, got "
                f"{list(jnp.shape(memory_bias))}{' without meta' if meta is None else ''}"
            )
        bias = reader_latent_bias(meta, memory_bias)
    x = embed_tokens(config, params, tokens)
    cos, sin = rope_cos_sin(config, pos)
    x, _, kv = run_layers(config, params["layers"], x, cos, sin, masked_attention(mask, bias, kv_index), remat=True)
    hidden = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    logits = None
    if compute_logits:
        logits = nn.with_logical_constraint(
            lm_logits(config, params, hidden), ("activation_batch", "activation_length", "activation_vocab")
        )
    keys, values = kv if kv is not None else (None, None)
    return ForwardOutput(logits, hidden, keys, values)


def reader_latent_bias(meta: TokenMeta, memory_bias: jax.Array) -> jax.Array:
    """float32 [b, t, s]: memory_bias[b, s] where query t is a READER and key s a LATENT, else 0
    (a segment's own tokens read its latents without it)."""
    reader = (jnp.asarray(meta.kind) == READER)[:, :, None]
    latent = (jnp.asarray(meta.kind) == LATENT)[:, None, :]
    return jnp.where(reader & latent, jnp.asarray(memory_bias, jnp.float32)[:, None, :], 0.0)


def pool_latents(config: ModelConfig, params: Params, hidden: jax.Array, latent_index: jax.Array) -> jax.Array:
    """The representation readout: float32 [batch, segments, dim], L2-normalised.

    hidden: [batch, length, hidden] from `forward`; latent_index: int32 [batch, segments, K],
    the row positions of each segment's meta latent tokens.
    """
    latents = jax.vmap(lambda h, i: h[i])(hidden, latent_index).astype(jnp.float32)  # [b, s, K, d]
    pooled = latents.mean(axis=2) if config.pooling == "mean" else latents[:, :, -1]
    if config.embed_dim is not None:
        pooled = pooled @ params["embed_head"].astype(jnp.float32)
    # rsqrt of the clamped square: the gradient of a clamped norm is NaN at an all-zero vector
    # (an unused segment slot of a padding row can pool exactly zero).
    return pooled * jax.lax.rsqrt(jnp.maximum(jnp.sum(pooled * pooled, axis=-1, keepdims=True), 1e-24))
