"""Weight-only int8 serving (grc_jax/quantize.py, Engine(weights="int8")) and the persistent
compilation cache setting (grc_jax/compile_cache.py), on a tiny random model."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from grc_jax import compile_cache, model, quantize
from grc_jax.config import ModelConfig
from grc_jax.data import demo_world
from grc_jax.inference import Engine
from grc_jax.tokenizer import Tokenizer

TEXTS = [
    "Zorvak lives in Quarn and keeps an owl.",
    "Belna is a glassblower from Ostreth.",
    "The river Quarn floods every spring.",
    "Who keeps an owl?",
]
# int8 logits may differ from float32 by at most this fraction of the float logits' largest
# magnitude. Per-channel int8 moves each weight by at most half a step (1/254 of its channel's
# largest weight); this random model, its weights scaled up 4x so that its logits are far from
# uniform, amplifies that to 2-5% (measured); SmolLM2's figure is in benchmarks/RESULTS.md.
REL_TOL = 0.08
OPTIONS = dict(num_pages=64, page_size=4, prefill_chunk=16, batch_size=4, compilation_cache=False)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(demo_world.train_tokenizer(TEXTS * 3, vocab_size=300))


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def setup(request, tokenizer):
    config = ModelConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        num_latents=4,
        max_segment_len=16,
        tie_word_embeddings=request.param,
    )
    params = jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(1))
    params = jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x, params)  # logits far from uniform
    return config, params


def _generate(engine: Engine, prompts: list[list[int]], n: int = 6) -> tuple[list[list[int]], list[np.ndarray]]:
    settings = engine.decoder.settings(n, record_logits=True)
    return engine.decoder.generate_with_logits(prompts, settings)


def _same_context(ref: tuple, got: tuple) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row, the two runs' logits over the steps that saw the same tokens: up to and
    including the first step whose greedy choices differ (after it the texts differ)."""
    pairs = []
    for ref_t, got_t, ref_l, got_l in zip(ref[0], got[0], ref[1], got[1]):
        first_diff = next((i for i, (a, b) in enumerate(zip(ref_t, got_t)) if a != b), len(ref_t) - 1)
        pairs.append((ref_l[: first_diff + 1], got_l[: first_diff + 1]))
    return pairs


def _prompts(tokenizer: Tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t) for t in TEXTS]


def test_quantized_params_are_int8_with_per_channel_scales(setup):
    config, params = setup
    q = quantize.quantize_params(params, config.tie_word_embeddings)
    L, D, H, KV, Dh, F = (
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.intermediate_size,
    )
    expected = {
        "q_proj": (H * Dh, D),
        "k_proj": (KV * Dh, D),
        "v_proj": (KV * Dh, D),
        "o_proj": (D, H * Dh),
        "gate_proj": (F, D),
        "up_proj": (F, D),
        "down_proj": (D, F),
    }
    for name, (out, inp) in expected.items():
        w = q["layers"][name]
        assert isinstance(w, quantize.Int8Weight), name
        assert w.q.dtype == np.int8 and w.q.shape == (L, out, inp), (name, w.q.dtype, w.q.shape)
        assert w.scale.dtype == np.float32 and w.scale.shape == (L, out), (name, w.scale.shape)
        # Per output channel: every channel's largest weight maps to +-127 exactly.
        np.testing.assert_array_equal(np.abs(np.asarray(w.q)).max(axis=-1), 127)
        # and the scales are those channels' own maxima, not one per tensor.
        float_w = np.asarray(params["layers"][name]).reshape(L, inp, out)
        np.testing.assert_allclose(np.asarray(w.scale), np.abs(float_w).max(axis=1) / 127, rtol=1e-6)
        # Dequantized, each weight is within half a step of its float value.
        back = np.asarray(w.dequantize()).reshape(L, inp, out)
        assert np.all(np.abs(back - float_w) <= np.asarray(w.scale)[:, None, :] / 2 + 1e-7), name
    head = q["lm_head"]
    assert head.q.dtype == np.int8 and head.q.shape == (config.total_vocab_size, D)
    assert head.scale.shape == (config.total_vocab_size,)
    # The float embedding stays for the exact lookup; norms stay float.
    assert q["embed"] is params["embed"] and q["layers"]["input_norm"] is params["layers"]["input_norm"]
    assert quantize.weight_bytes({"layers": {k: q["layers"][k] for k in expected}}) < 0.3 * quantize.weight_bytes(
        {"layers": {k: params["layers"][k] for k in expected}}
    )


def test_int8_logits_match_float32_prefill_and_decode(setup, tokenizer):
    """Through Engine's decoder: prefill (several rows at once, the dequantize-and-dot path),
    then decode at batch 1 (the multiply-and-row-sum path) and at batch 4."""
    config, params = setup
    float_engine = Engine(config, params, tokenizer, **OPTIONS)
    int8_engine = Engine(config, params, tokenizer, weights="int8", **OPTIONS)
    prompts = _prompts(tokenizer)
    for batch in ([prompts[0]], prompts):
        for r, g in _same_context(_generate(float_engine, batch), _generate(int8_engine, batch)):
            assert r.shape == g.shape
            scale = np.abs(r).max()
            err = np.abs(r - g).max()
            assert err <= REL_TOL * scale, (len(batch), err, scale)
            assert err > 0  # really the int8 weights, not the float ones
    # Exactly the dequantized model: int8 logits equal float32 logits of the weights q * scale.
    q = quantize.quantize_params(params, config.tie_word_embeddings)
    deq = jax.tree.map(lambda a: a, params)
    deq["layers"] = {
        k: (
            q["layers"][k].dequantize().reshape(params["layers"][k].shape)
            if isinstance(q["layers"][k], quantize.Int8Weight)
            else v
        )
        for k, v in params["layers"].items()
    }
    deq["lm_head"] = q["lm_head"].dequantize()  # tied: a float head beside the float lookup table
    deq_config = dataclasses.replace(config, tie_word_embeddings=False)
    deq_engine = Engine(deq_config, deq, tokenizer, **OPTIONS)
    for batch in ([prompts[1]], prompts):
        ref, got = _generate(deq_engine, batch), _generate(int8_engine, batch)
        assert ref[0] == got[0]
        for r, g in zip(ref[1], got[1]):
            np.testing.assert_allclose(g, r, atol=1e-4 * np.abs(r).max(), rtol=0)


def test_int8_greedy_agrees_where_the_float_choice_is_clear(setup, tokenizer):
    """Greedy text: every step whose float32 top-2 margin exceeds twice the int8 error bound picks
    the same token, and over the prompt set most steps agree."""
    config, params = setup
    float_engine = Engine(config, params, tokenizer, **OPTIONS)
    int8_engine = Engine(config, params, tokenizer, weights="int8", **OPTIONS)
    prompts = _prompts(tokenizer)
    n = 8
    settings = float_engine.decoder.settings(n, record_logits=True)
    ref_tokens, ref_logits = float_engine.decoder.generate_with_logits(prompts, settings)
    got_tokens = int8_engine.decoder.generate(prompts, int8_engine.decoder.settings(n))
    agreed = total = 0
    for ref_t, got_t, logits in zip(ref_tokens, got_tokens, ref_logits):
        first_diff = next((i for i, (a, b) in enumerate(zip(ref_t, got_t)) if a != b), len(ref_t))
        agreed += first_diff
        total += len(ref_t)
        if first_diff < len(ref_t):  # the texts split where float32's choice was a near tie
            top2 = np.sort(logits[first_diff])[-2:]
            assert top2[1] - top2[0] <= 2 * REL_TOL * np.abs(logits[first_diff]).max(), (first_diff, top2)
    assert agreed / total >= 0.5, (agreed, total)


def test_engine_rejects_unknown_weights(setup, tokenizer):
    config, params = setup
    with pytest.raises(ValueError, match="weights must be 'float' or 'int8', got 'int4'"):
        Engine(config, params, tokenizer, weights="int4", **OPTIONS)


@pytest.fixture
def restore_cache_config():
    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in before.items():
        jax.config.update(k, v)
    compile_cache._ours = None
    compile_cache._reset()


def test_compilation_cache_is_set_and_can_be_turned_off(setup, tokenizer, tmp_path, monkeypatch, restore_cache_config):
    config, params = setup
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # Default: on, at the documented location, every program cached.
    engine = Engine(config, params, tokenizer, **{**OPTIONS, "compilation_cache": None})
    default = str(tmp_path / "xdg" / "grc_jax" / "jax_cache")
    assert engine.compilation_cache_dir == default == jax.config.jax_compilation_cache_dir
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
    # Compiled programs land there (a program first compiled now, after the setting).
    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0)).block_until_ready()
    assert any((tmp_path / "xdg" / "grc_jax" / "jax_cache").iterdir())
    # An explicit directory wins; the argument False turns the cache off.
    assert compile_cache.enable(tmp_path / "mine") == str(tmp_path / "mine") == jax.config.jax_compilation_cache_dir
    off = Engine(config, params, tokenizer, **{**OPTIONS, "compilation_cache": False})
    assert off.compilation_cache_dir is None and jax.config.jax_compilation_cache_dir is None
    # The environment variable: a directory, or off.
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.enable() == str(tmp_path / "env") == jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.enable() is None and jax.config.jax_compilation_cache_dir is None
    # A directory the user gave JAX directly is left alone.
    monkeypatch.delenv(compile_cache.ENV)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users"))
    assert compile_cache.enable() == str(tmp_path / "users")
    assert compile_cache.enable(False) == str(tmp_path / "users")
