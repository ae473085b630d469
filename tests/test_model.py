"""The model under the GRC rule: a segment's embedding and memory depend on its own text only."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax import layout, model
from grc_jax.config import ModelConfig, from_hf_config, to_hf_config
from grc_jax.eval.attention import attention_probabilities

P, K, V = 16, 4, 64
CONFIG = ModelConfig(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    num_latents=K,
    max_segment_len=P,
)
PARAMS = jax.tree.map(lambda a: a * 5, model.init_params(CONFIG, jax.random.key(0)))  # O(1) activations
LATENTS = list(CONFIG.latent_token_ids)


def run(examples, length=64, config=CONFIG, params=PARAMS):
    """Packs examples into one row; returns (embeddings [segments, d], keys [L, segments, K, kv, d], row)."""
    rows = layout.pack_rows([layout.example_pieces(s, r, LATENTS, P) for s, r in examples], length)
    assert len(rows) == 1
    row = rows[0]
    meta = layout.TokenMeta(row.example[None], row.segment[None], row.kind[None])
    index = jnp.asarray(row.latent_index[None])
    out = model.forward(config, params, row.tokens[None], meta, kv_index=index.reshape(1, -1))
    emb = model.pool_latents(config, params, out.hidden, index)[0]
    keys = out.keys[:, 0].reshape(config.num_layers, -1, K, config.num_kv_heads, config.head_dim)
    values = out.values[:, 0].reshape(keys.shape)
    return np.asarray(emb), np.asarray(keys), np.asarray(values), out, row


DOC = [5, 6, 7, 8, 9, 10, 11]


def test_segment_readout_ignores_other_segments_and_readers():
    """The segment that changes comes before DOC in the row, so causal order alone would let DOC
    see it; and the readers after DOC change too."""
    emb, keys, values, *_ = run([([[12, 13, 14], DOC], [20, 21, 22])])
    emb2, keys2, values2, *_ = run([([[40, 41, 42, 43, 44], DOC], [30, 31, 32, 33])])
    np.testing.assert_allclose(emb2[1], emb[1], atol=1e-5)
    np.testing.assert_allclose(keys2[:, 1], keys[:, 1], atol=1e-5)
    np.testing.assert_allclose(values2[:, 1], values[:, 1], atol=1e-5)
    assert np.abs(emb2[0] - emb[0]).max() > 1e-3  # the changed segment's own readout does change
    emb3, *_ = run([([[12, 13, 14], [5, 6, 7, 8, 9, 10, 12]], [20, 21, 22])])
    assert np.abs(emb3[1] - emb[1]).max() > 1e-3  # its own text does matter


def test_segment_readout_is_the_same_wherever_it_sits_in_the_row():
    emb, keys, _, _, row = run([([DOC], [])])
    emb2, keys2, _, _, row2 = run([([[1, 2, 3]], [4, 4]), ([[7, 7], DOC], [3])])
    assert row2.latent_index[2, 0] > row.latent_index[0, 0]
    np.testing.assert_allclose(emb2[2], emb[0], atol=1e-5)
    np.testing.assert_allclose(keys2[:, 2], keys[:, 0], atol=1e-5)


@pytest.mark.slow
def test_memory_alone_equals_memory_in_a_packed_training_row():
    """What `compress` will compute (one segment, nothing else) is what training used."""
    *_, out_alone, _ = run([([DOC], [])], length=len(DOC) + K)
    # DOC after another segment of its own example: that segment must not reach its memory.
    _, keys, values, out_packed, row = run([([[3, 3, 3]], [2, 2]), ([[9, 9], DOC], [1, 2, 3])])
    alone_k = np.asarray(out_alone.keys[:, 0])
    np.testing.assert_allclose(keys[:, 2], alone_k, atol=1e-5)


def test_packed_examples_never_see_each_other():
    base = [([DOC], [20, 21, 22]), ([[30, 31]], [32, 33, 34])]
    changed = [([[50, 51, 52, 53, 54, 55, 56]], [57, 58, 59]), ([[30, 31]], [32, 33, 34])]
    *_, out, row = run(base)
    *_, out2, row2 = run(changed)
    second = row.example == 2
    np.testing.assert_array_equal(second, row2.example == 2)
    np.testing.assert_allclose(np.asarray(out2.logits)[0, second], np.asarray(out.logits)[0, second], atol=1e-5)


def test_reader_sees_segments_only_through_memory():
    """No reader attends to any segment's text (read from the row's roles, not from layout's
    mask), yet its output depends on that text, through the segment's latents."""
    *_, out, row = run([([DOC, [12, 13]], [20, 21, 22])])
    meta = layout.TokenMeta(row.example[None], row.segment[None], row.kind[None])
    probs = np.asarray(attention_probabilities(CONFIG, PARAMS, jnp.asarray(row.tokens[None]), meta))[:, 0]
    reader, text, latent = (
        (row.kind == kind) & (row.example > 0) for kind in (layout.READER, layout.TEXT, layout.LATENT)
    )
    assert np.all(probs[:, :, reader][..., text] == 0)
    assert np.all(probs[:, :, reader][..., latent].sum(-1) > 0)
    *_, out2, _ = run([([[12, 13, 14, 15, 16, 17, 18], [12, 13]], [20, 21, 22])])
    assert np.abs(np.asarray(out2.logits)[0, reader] - np.asarray(out.logits)[0, reader]).max() > 1e-3


def test_attention_probabilities_are_the_forward_pass_attention():
    """Inspection through the shared layer loop (`model.run_layers` with an attention that
    records its probabilities) sees the attention the forward pass runs."""
    *_, out, row = run([([DOC, [12, 13, 14]], [20, 21, 22]), ([[30, 31]], [32, 33])])
    meta = layout.TokenMeta(row.example[None], row.segment[None], row.kind[None])
    probs = np.asarray(attention_probabilities(CONFIG, PARAMS, jnp.asarray(row.tokens[None]), meta))
    assert probs.shape == (CONFIG.num_layers, 1, CONFIG.num_heads, len(row.tokens), len(row.tokens))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    allowed = np.asarray(layout.attention_mask(meta))[0]
    assert np.all(probs[..., ~allowed] == 0)
    # A reader's attention over the first example's latents: both segments get some of it.
    reader = np.flatnonzero((row.kind == layout.READER) & (row.example == 1))[-1]
    assert all(probs[:, 0, :, reader, row.latent_index[s]].sum() > 0 for s in (0, 1))
    # Replaying the layers with these probabilities gives the forward pass's hidden states.
    x = jnp.take(PARAMS["embed"], jnp.asarray(row.tokens[None]), axis=0)
    cos, sin = model.rope_cos_sin(CONFIG, layout.positions(meta, P, K))
    for i in range(CONFIG.num_layers):
        p = jax.tree.map(lambda a: a[i], PARAMS["layers"])
        q, k, v = model.attention_inputs(CONFIG, p, x, cos, sin)
        v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
        x = model.layer_output(CONFIG, p, x, jnp.einsum("bhts,bshd->bthd", probs[i], v))
    hidden = model.rms_norm(x, PARAMS["final_norm"], CONFIG.rms_norm_eps)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(out.hidden), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("change", [dict(scan_layers=False), dict(remat_policy="full"), dict(remat_policy="dots")])
def test_scan_unroll_and_remat_give_the_same_outputs_and_grads(change):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 12)), jnp.int32)

    def loss(params, config):
        return model.forward(config, params, tokens).logits.mean()

    l1, g1 = jax.value_and_grad(loss)(PARAMS, CONFIG)
    l2, g2 = jax.value_and_grad(loss)(PARAMS, CONFIG.replace(**change))
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5), g1, g2)


def test_bfloat16_compute_tracks_float32():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (2, 12)), jnp.int32)
    ref = model.forward(CONFIG, PARAMS, tokens).logits
    bf16 = model.forward(CONFIG.replace(dtype="bfloat16"), PARAMS, tokens).logits
    assert bf16.dtype == jnp.float32
    # bf16 rounds each op to 8 mantissa bits (~0.4%); through 2 layers the error stays at a few
    # percent of the logits' scale on average (measured ~1-2%), far below a real mistake (~100%).
    diff = np.abs(np.asarray(bf16) - np.asarray(ref))
    assert diff.mean() < 0.03 * np.abs(np.asarray(ref)).mean(), diff.mean()


def test_every_parameter_has_logical_axes():
    axes = model.param_logical_axes(CONFIG)
    shapes = model.param_shapes(CONFIG)
    flat_axes = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
    assert [p for p, _ in flat_axes] == [p for p, _ in flat_shapes]
    for (path, spec), (_, shape) in zip(flat_axes, flat_shapes):
        assert len(spec) == len(shape.shape) and all(spec), path
    assert axes["layers"]["q_proj"] == jax.sharding.PartitionSpec("layers", "embed", "q_heads", "head_dim")


def test_forward_is_jittable_with_config_static():
    tokens = jnp.ones((1, 5), jnp.int32)
    jitted = jax.jit(model.forward, static_argnums=0)
    np.testing.assert_allclose(
        jitted(CONFIG, PARAMS, tokens).logits, model.forward(CONFIG, PARAMS, tokens).logits, atol=1e-6
    )


def test_forward_input_errors():
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\], got shape \(5,\)"):
        model.forward(CONFIG, PARAMS, jnp.ones(5, jnp.int32))
    meta = layout.causal_meta(jnp.ones((1, 4), bool))
    with pytest.raises(ValueError, match=r"meta\.example has shape \(1, 4\), tokens \(1, 5\)"):
        model.forward(CONFIG, PARAMS, jnp.ones((1, 5), jnp.int32), meta)
    with pytest.raises(ValueError, match=r"valid has shape \(1, 4\), tokens \(1, 5\)"):
        model.forward(CONFIG, PARAMS, jnp.ones((1, 5), jnp.int32), valid=jnp.ones((1, 4), bool))


def test_config_errors():
    with pytest.raises(ValueError, match=r"num_heads=6 is not a multiple of num_kv_heads=4"):
        ModelConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"num_heads and num_kv_heads must be >= 1, got 4 and 0"):
        ModelConfig(num_heads=4, num_kv_heads=0)
    with pytest.raises(ValueError, match=r"pooling 'max' is not one of"):
        ModelConfig(pooling="max")
    with pytest.raises(ValueError, match=r"remat_policy 'some' is not one of"):
        ModelConfig(remat_policy="some")
    with pytest.raises(ValueError, match=r"matmul_dtype 'float16' is not one of \('float32', 'bfloat16'\)"):
        ModelConfig(matmul_dtype="float16")
    with pytest.raises(ValueError, match=r"qk_norm=True does not fit architecture 'LlamaForCausalLM'"):
        ModelConfig(qk_norm=True)
    with pytest.raises(ValueError, match=r"qk_norm=False does not fit architecture 'Qwen3ForCausalLM'"):
        ModelConfig(architecture="Qwen3ForCausalLM")
    with pytest.raises(ValueError, match=r"qkv_bias=False does not fit architecture 'Qwen2ForCausalLM'"):
        ModelConfig(architecture="Qwen2ForCausalLM")


@pytest.mark.slow
def test_pooling_last_and_linear_head():
    config = CONFIG.replace(pooling="last", embed_dim=12)
    params = model.init_params(config, jax.random.key(0))
    assert params["embed_head"].shape == (32, 12)
    hidden = jax.random.normal(jax.random.key(1), (1, 6, 32))
    emb = model.pool_latents(config, params, hidden, jnp.asarray([[[2, 3, 4, 5]]]))
    expected = hidden[0, 5] @ params["embed_head"]
    np.testing.assert_allclose(emb[0, 0], expected / jnp.linalg.norm(expected), atol=1e-6)


def test_latents_of_a_model_trained_from_scratch_start_distinct():
    embed = np.asarray(model.init_params(CONFIG, jax.random.key(1))["embed"])
    latents = embed[CONFIG.vocab_size :]
    assert latents.shape[0] == K
    # Random rows, at the scale of the base rows: not K copies of their near-zero mean.
    assert np.linalg.norm(latents - latents.mean(0), axis=1).min() > 0.5 * np.linalg.norm(embed[:V], axis=1).mean()


@pytest.mark.slow
def test_random_init_std_is_initializer_range():
    wide = CONFIG.replace(hidden_size=256, intermediate_size=512, initializer_range=0.0625)
    for config in (wide, wide.replace(initializer_range=0.02)):
        params = model.init_params(config, jax.random.key(2))
        for name in ("embed", "layers/q_proj", "layers/down_proj"):
            weights = params
            for key in name.split("/"):
                weights = weights[key]
            assert abs(float(np.std(np.asarray(weights))) / config.initializer_range - 1) < 0.05, name
        assert np.all(np.asarray(params["layers"]["input_norm"]) == 1.0)


def test_initializer_range_round_trips_through_the_hf_config():
    config = CONFIG.replace(initializer_range=0.09)
    assert to_hf_config(config)["initializer_range"] == 0.09
    assert from_hf_config(to_hf_config(config), num_latents=K, max_segment_len=P).initializer_range == 0.09
    with pytest.raises(ValueError, match=r"initializer_range must be > 0, got 0"):
        ModelConfig(initializer_range=0)


def test_pooling_has_finite_gradients_at_an_all_zero_slot():
    """An unused segment slot of a padding row can pool an exactly zero vector."""
    hidden = jnp.zeros((1, 6, CONFIG.hidden_size)).at[0, 3:].set(1.0)
    index = jnp.asarray([[[0, 1], [3, 4]]])  # slot 0 pools zeros, slot 1 does not
    grad = jax.grad(lambda h: model.pool_latents(CONFIG, PARAMS, h, index).sum())(hidden)
    assert np.all(np.isfinite(np.asarray(grad)))
    emb = np.asarray(model.pool_latents(CONFIG, PARAMS, hidden, index))[0]
    np.testing.assert_allclose(emb[0], 0.0)
    np.testing.assert_allclose(np.linalg.norm(emb[1]), 1.0, rtol=1e-6)


def test_bfloat16_logits_are_accumulated_in_float32():
    config = dataclasses.replace(CONFIG, dtype="bfloat16")
    hidden = jax.random.normal(jax.random.key(3), (2, 5, config.hidden_size), jnp.bfloat16)
    head = PARAMS["embed"].T if config.tie_word_embeddings else PARAMS["lm_head"]
    want = np.asarray(hidden, np.float32) @ np.asarray(head.astype(jnp.bfloat16), np.float32)
    np.testing.assert_allclose(np.asarray(model.lm_logits(config, PARAMS, hidden)), want, rtol=1e-5, atol=1e-5)


def _rounded(a):
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize(
    "x_shape, w_shape, contract, transposed",
    [
        ((2, 5, 8), (8, 6), 1, False),
        ((2, 5, 3, 4), (3, 4, 7), 2, False),
        ((2, 5, 8), (8, 3, 4), 1, False),
        ((2, 5, 8), (11, 8), 1, True),
    ],
    ids=["dense", "o_proj", "q_proj", "tied_head"],
)
def test_bf16_product_is_the_float32_product_of_rounded_operands(x_shape, w_shape, contract, transposed):
    kx, kw, kg = jax.random.split(jax.random.key(4), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    y, vjp = jax.vjp(lambda x, w: model.bf16_product(x, w, contract, transposed), x, w)
    g = jax.random.normal(kg, y.shape)
    dx, dw = vjp(g)
    reference = lambda x, w: jnp.tensordot(x, w.T if transposed else w, axes=contract)
    want, want_vjp = jax.vjp(reference, _rounded(x), _rounded(w))
    want_dx, want_dw = want_vjp(_rounded(g))  # the cotangent is rounded too
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32 and dw.shape == w.shape
    for got, ref in [(y, want), (dx, want_dx), (dw, want_dw)]:
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # and it is not float32's product: the rounding shows
    assert np.abs(np.asarray(y) - np.asarray(reference(x, w))).max() > 1e-4


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_matmul_dtype_bfloat16_tracks_float32_in_loss_and_gradients(tied):
    config = CONFIG.replace(tie_word_embeddings=tied)
    params = jax.tree.map(lambda a: a * 5, model.init_params(config, jax.random.key(0)))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, V, (2, 12)), jnp.int32)

    def loss(params, config):
        logp = jax.nn.log_softmax(model.forward(config, params, tokens).logits, axis=-1)
        return -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1).mean()

    bf16 = config.replace(matmul_dtype="bfloat16")
    step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l32, g32), (l16, g16) = step(params, config), step(params, bf16)
    # Each of the layer's 7 weight matmuls and the head is one bfloat16 x bfloat16 -> float32 product
    # forward and two backward (the scanned layer is one body); the attention's 2 + 4 stay float32.
    for cfg, bf16_products, f32_products in [(bf16, 3 * (7 + 1), 6), (config, 0, 30)]:
        text = step.lower(params, cfg).as_text()
        operands = re.findall(
            r"dot_general .*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>", text
        )
        assert operands.count(("bf16", "bf16", "f32")) == bf16_products
        assert operands.count(("f32", "f32", "f32")) == f32_products and len(operands) == 30
    # bfloat16 keeps 8 mantissa bits: the loss moves by well under 1%, every gradient's direction stays.
    assert abs(float(l16) - float(l32)) < 0.01 * abs(float(l32))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g32), jax.tree.leaves(g16)):
        a, b = np.ravel(a), np.ravel(b)
        if np.linalg.norm(a) > 1e-6:
            cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            assert cosine > 0.99, (jax.tree_util.keystr(path), cosine)
