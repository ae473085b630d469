"""The decode loop against uncached references: `model.forward` (plain and with the GRC reader
mask), transformers' greedy `generate`; sampling, stops, budgets, streaming, donation.

Reference logits come from one teacher-forced forward pass over prompt + generated tokens: where
greedy picked the argmax at each step, the logits at those positions are the steps' logits.
Rows are padded to one fixed width so the references compile once (and never at width 8, where
XLA:CPU on this machine fails to compile the attention mask under jit).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax import compile_cache, hf, layout, model
from grc_jax.config import ModelConfig
from grc_jax.inference import loop, strategy
from grc_jax.inference.decoder import Decoder, DecodeSettings
from grc_jax.inference.pages import OutOfPages
from grc_jax.inference.sampling import Sampling, sample_logits

sys.path.insert(0, str(Path(__file__).parent))
import tiny_hf  # noqa: E402

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    num_latents=4,
    max_segment_len=16,
)
REF_WIDTH = 40
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [5], [7, 8, 9]]  # 11 tokens: 2 prefill chunks, 3 pages
# Logits differ from the references by float32 summation order only (~1e-6 relative).
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def params():
    p = jax.jit(model.init_params, static_argnums=0)(CONFIG, jax.random.key(0))
    return jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x, p)  # peaked logits: no argmax ties


@pytest.fixture(scope="module")
def decoder(params):
    return Decoder(CONFIG, params, num_pages=64, page_size=4, prefill_chunk=8)


@functools.partial(jax.jit, static_argnums=0)
def _plain_logits(config, params, tokens, valid):
    return model.forward(config, params, tokens, valid=valid).logits[..., : config.vocab_size]


@functools.partial(jax.jit, static_argnums=0)
def _meta_forward(config, params, row):
    """Training-mode forward of one packed row: (logits, hidden, keys, values)."""
    meta = layout.TokenMeta(*(jnp.asarray(getattr(row, f))[None] for f in ("example", "segment", "kind")))
    index = row.latent_index[None, 0] if row.latent_index.size else jnp.zeros((1, CONFIG.num_latents), jnp.int32)
    out = model.forward(config, params, jnp.asarray(row.tokens)[None], meta, kv_index=index)
    return out.logits[0, :, : config.vocab_size], out.hidden, out.keys[:, 0], out.values[:, 0]


def training_row(segments, reader):
    pieces = layout.example_pieces(segments, reader, CONFIG.latent_token_ids, CONFIG.max_segment_len)
    return layout.pack_rows([pieces], REF_WIDTH)[0], sum(len(t) for _, _, t in pieces)


def plain_step_logits(params, prompt, generated):
    """Uncached logits at each generation step, plain causal, positions from 0."""
    seq = list(prompt) + list(generated)
    tokens = np.zeros((1, REF_WIDTH), np.int32)
    tokens[0, : len(seq)] = seq
    logits = _plain_logits(CONFIG, params, jnp.asarray(tokens), jnp.asarray(np.arange(REF_WIDTH)[None] < len(seq)))
    return np.asarray(logits[0, len(prompt) - 1 : len(seq) - 1])


def memory_kv(params, segment):
    """A memory computed in a training-layout row of its own: [layers, K, kv, d] twice."""
    row, _ = training_row([segment], [])
    _, _, keys, values = _meta_forward(CONFIG, params, row)
    return np.asarray(keys), np.asarray(values)


@pytest.mark.slow
@pytest.mark.parametrize("per_layer_weights", [True, False], ids=["per-layer", "stacked"])
def test_greedy_decode_equals_uncached_forward(params, per_layer_weights):
    # per-layer: the CPU default (an unrolled loop over separate arrays); stacked: the scan that
    # accelerators run.
    decoder = Decoder(CONFIG, params, num_pages=64, page_size=4, prefill_chunk=8, per_layer_weights=per_layer_weights)
    assert isinstance(decoder.params["layers"], tuple) == per_layer_weights
    # 11 + 10 tokens: a 32-token buffer of 8 token pages; the loops attend over 4, then 6 of them
    assert strategy.table_widths(8, None) == (4, 6, 8)
    out, logits = decoder.generate_with_logits(PROMPTS, decoder.settings(10, record_logits=True))
    for prompt, generated, step_logits in zip(PROMPTS, out, logits):
        ref = plain_step_logits(params, prompt, generated)
        assert generated == ref.argmax(-1).tolist()
        np.testing.assert_allclose(step_logits, ref, **TOL)
    decoder.allocator.check()
    assert decoder.allocator.num_free == 64  # every token page came back


@pytest.mark.slow
def test_generation_with_memories_equals_training_forward_with_reader_mask(decoder, params):
    docs = {"a": [3, 4, 5, 6, 7], "b": [9, 10, 11, 12, 13, 14, 15]}
    kv = {m: memory_kv(params, d) for m, d in docs.items()}
    source = lambda ids: tuple(np.stack([kv[m][i] for m in ids]) for i in (0, 1))
    prompts, memories = [[20, 21, 22], [20, 21, 22], [30]], [["a", "b"], ["b"], ["b", "a"]]
    out, logits = decoder.generate_with_logits(
        prompts, decoder.settings(5, record_logits=True), memories=memories, memory_source=source
    )
    for prompt, mems, generated, step_logits in zip(prompts, memories, out, logits):
        # The training layout: each memory's text then its latents, then the READER tokens.
        row, end = training_row([docs[m] for m in mems], prompt + generated)
        ref = np.asarray(_meta_forward(CONFIG, params, row)[0])[end - len(generated) - 1 : end - 1]
        assert generated == ref.argmax(-1).tolist()
        np.testing.assert_allclose(step_logits, ref, **TOL)
    # the memories stay resident, unheld, for the next request
    assert decoder.allocator.memory_refs("a") == 0 and decoder.allocator.memory_pages("a") is not None
    decoder.allocator.check()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_decode_equals_transformers_generate(tmp_path, kind):
    import torch

    hf_model = tiny_hf.make_hf_model(kind, tmp_path)
    config, params = hf.load_pretrained(tmp_path, num_latents=4)
    dec = Decoder(config, params, num_pages=32, page_size=4, prefill_chunk=16)
    prompts = [[5, 6, 7], [11, 3, 90, 41, 2, 17, 60]]
    ours = dec.generate(prompts, dec.settings(10))
    for prompt, generated in zip(prompts, ours):
        ids = torch.tensor([prompt])
        theirs = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert generated == theirs[0, len(prompt) :].tolist()


def test_sampling_supports_and_greedy_limits():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]] * 2000))  # one row per key
    key = jax.random.key(1)

    def support(**kw):
        return set(np.unique(np.asarray(sample_logits(logits, key, Sampling(**kw)))).tolist())

    assert support(temperature=1.0) == {0, 1, 2, 3}
    assert support(temperature=1.0, top_k=2) == {1, 3}
    assert support(temperature=1.0, top_p=0.7) == {1, 3}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert support(temperature=1.0, top_p=0.85) == {1, 3, 2}
    assert support(temperature=1.0, top_k=3, top_p=0.5) == {1}
    assert support(temperature=5.0, top_k=1) == {1}
    rng = np.random.default_rng(0)
    random_logits = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    np.testing.assert_array_equal(
        sample_logits(random_logits, key, Sampling(temperature=0.8, top_k=1)),
        sample_logits(random_logits, key, Sampling()),
    )
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(temperature=1.0, top_p=0.0)
    for bad_k in (0, 2.5):
        with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
            Sampling(temperature=1.0, top_k=bad_k)
    for bad_t in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            Sampling(temperature=bad_t)


SAMPLED = Sampling(temperature=3.0, top_k=3)


@pytest.mark.slow
def test_sampled_decoding_is_seeded_and_respects_top_k(decoder):
    greedy = decoder.generate(PROMPTS, decoder.settings(6))
    settings = decoder.settings(6, SAMPLED, record_logits=True)
    a, logits = decoder.generate_with_logits(PROMPTS, settings, seed=7)
    b, _ = decoder.generate_with_logits(PROMPTS, settings, seed=7)
    c, _ = decoder.generate_with_logits(PROMPTS, settings, seed=8)
    assert a == b and a != c and a != greedy
    for generated, step_logits in zip(a, logits):
        top3 = np.argsort(step_logits, axis=-1)[:, -3:]
        assert all(t in row for t, row in zip(generated, top3))


@pytest.mark.slow
def test_stop_tokens_and_per_row_budgets(decoder):
    free = decoder.generate(PROMPTS, decoder.settings(6))
    stop = free[0][2]  # row 0 makes this token third
    out = decoder.generate(PROMPTS, decoder.settings(6, stop_token_ids=(stop,)), budgets=[6, 4, 0])
    assert out[0] == free[0][: free[0].index(stop) + 1]  # ends with the stop token
    for row in (1, 2):
        want = free[row][: [6, 4, 0][row]]
        if stop in want:
            want = want[: want.index(stop) + 1]
        assert out[row] == want
    with pytest.raises(ValueError, match=r"budgets must be 3 values in \[0, max_new_tokens=6\]"):
        decoder.generate(PROMPTS, decoder.settings(6), budgets=[7, 1, 1])


def test_streaming_yields_the_tokens_of_the_single_call(decoder):
    settings = decoder.settings(7, SAMPLED, record_logits=True)  # the compiled program of the test above
    whole = decoder.generate(PROMPTS, settings, seed=3, budgets=[7, 5, 7])
    chunks = list(decoder.stream(PROMPTS, settings, steps_per_chunk=3, seed=3, budgets=[7, 5, 7]))
    assert len(chunks) == 3  # steps 1-3, 4-6, 7
    assert [len(c) for c in chunks[0]] == [3, 3, 3]
    joined = [sum((c[row] for c in chunks), []) for row in range(len(PROMPTS))]
    assert joined == whole
    decoder.allocator.check()
    assert decoder.allocator.num_free == 64


def test_closing_a_stream_early_frees_its_pages(decoder):
    stream = decoder.stream(PROMPTS, decoder.settings(7), steps_per_chunk=2)
    next(stream)
    with pytest.raises(RuntimeError, match="the decoder is running another batch"):
        decoder.generate(PROMPTS, decoder.settings(7))
    stream.close()
    assert decoder.allocator.num_free == 64


def test_a_new_token_limit_compiles_no_new_loop(decoder):
    """The limit is each row's budget in the state, not a compiled setting: two limits whose
    buffers fall in one size bucket run one program."""
    short = decoder.generate(PROMPTS, decoder.settings(3))
    # Programs made: by jit, traced, or through the compilation cache's programs directory.
    compiled = (loop.run._cache_size(), loop.TRACES["run"], sum(compile_cache.STATS.values()))
    longer = decoder.generate(PROMPTS, decoder.settings(4))
    assert (loop.run._cache_size(), loop.TRACES["run"], sum(compile_cache.STATS.values())) == compiled
    assert [row[:3] for row in longer] == short and all(len(row) == 4 for row in longer)
    assert decoder.settings(3).loop_settings() == decoder.settings(4).loop_settings()


def test_decode_state_buffers_are_donated(decoder):
    batch = decoder.start(PROMPTS, decoder.settings(4))
    state = batch.state
    decoder.advance(batch, 4)
    assert state.pool.k.is_deleted() and state.pool.v.is_deleted() and state.tokens.is_deleted()
    assert not batch.state.pool.k.is_deleted()
    decoder.finish(batch)
    assert decoder.pool is batch.state.pool


@pytest.mark.slow
def test_reason_embed_matches_the_segment_embedding_of_its_own_trace(decoder, params):
    free = decoder.generate(PROMPTS[:2], decoder.settings(5))
    eor = free[0][1]  # row 0 writes it second; row 1 is cut at its budget and gets one appended
    emb, reasoning = decoder.reason_embed(
        PROMPTS[:2], max_reason_tokens=5, eor_id=eor, latent_ids=CONFIG.latent_token_ids, budgets=[5, 3]
    )
    assert reasoning[0] == free[0][:2]
    assert reasoning[1] == free[1][:3] and eor not in reasoning[1]
    for i, (prompt, trace) in enumerate(zip(PROMPTS, reasoning)):
        segment = prompt + trace + ([] if trace[-1:] == [eor] else [eor])
        row, _ = training_row([segment], [])
        hidden = _meta_forward(CONFIG, params, row)[1]
        ref = model.pool_latents(CONFIG, params, hidden, jnp.asarray(row.latent_index)[None])[0, 0]
        # text at positions P-L.. in training, 0.. here: equal by RoPE's shift invariance
        np.testing.assert_allclose(emb[i], np.asarray(ref), rtol=1e-4, atol=1e-5)
    assert decoder.allocator.num_free == 64


def test_out_of_pages_leaves_the_decoder_usable(decoder):
    want = decoder.generate(PROMPTS, decoder.settings(6))
    before = decoder.allocator.snapshot()
    with pytest.raises(
        OutOfPages,
        match=r"out of KV pages: prompt 1 \(201 tokens\) needs 51 page\(s\) of 4 slots, "
        r"11 of 64 are free .*; this batch's prompts need \[53, 51, 51\] token pages",
    ):
        # the first row (11 + 200 tokens) takes 53 of the 64 pages; the second cannot fit
        decoder.generate(PROMPTS, decoder.settings(200))
    after = decoder.allocator.snapshot()
    assert sorted(after[0]) == sorted(before[0]) and after[4] == before[4] == {}
    assert decoder.generate(PROMPTS, decoder.settings(6)) == want


def test_bad_requests_get_errors_that_name_the_problem(decoder):
    s = decoder.settings(2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        decoder.generate([[1], []], s)
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside the vocabulary \[0, 68\): \[99\]"):
        decoder.generate([[1, 99]], s)
    with pytest.raises(ValueError, match="memories were named but no memory_source"):
        decoder.generate([[1]], s, memories=[["a"]])
    with pytest.raises(ValueError, match="settings.page_size=16 but the pool's pages hold 4"):
        decoder.generate([[1]], DecodeSettings(max_new_tokens=2))
    with pytest.raises(KeyError, match="unknown"):
        decoder.generate(
            [[1]], s, memories=[["zz"]], memory_source=lambda ids: (_ for _ in ()).throw(KeyError("unknown"))
        )
    K, shape = CONFIG.num_latents, (CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim)
    for slots in (K - 1, K + 1):
        short = np.zeros((1, shape[0], slots, *shape[1:]), np.float32)
        with pytest.raises(
            ValueError,
            match=rf"memory_source gave keys of shape \[1, {shape[0]}, {slots}, .*for "
            rf"memories \['m'\]; this model reads .*\[1, {shape[0]}, {K}, ",
        ):
            decoder.generate([[1]], s, memories=[["m"]], memory_source=lambda ids: (short, short))
    assert decoder.allocator.num_free == 64
