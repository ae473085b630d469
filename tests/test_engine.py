"""Engine (opening models, compress, embed/encode, generate, search, RAG) and MemoryBank
(edits, atomic save/load, mismatch and bad-input errors), on a tiny random model."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import stat
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grc_jax import hf, layout, model
from grc_jax.config import ModelConfig
from grc_jax.data import demo_world
from grc_jax.inference import BankSpec, Engine, MemoryBank
from grc_jax.inference import memory_bank as memory_bank_module
from grc_jax.tokenizer import Tokenizer

DOCS = [
    "Zorvak lives in Quarn and keeps an owl.",
    "Belna is a glassblower from Ostreth.",
    "The river Quarn floods every spring.",
]
LONG = "Belna is a glassblower from Ostreth; her mentor is Zorvak, who lives in Quarn and keeps an owl."
QUESTION = "Who keeps an owl?"


@pytest.fixture(scope="module")
def tokenizer():
    inner = demo_world.train_tokenizer((DOCS + [LONG, QUESTION]) * 3, vocab_size=360)
    return Tokenizer(inner)


@pytest.fixture(scope="module")
def config(tokenizer):
    return ModelConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        num_latents=4,
        max_segment_len=16,
    )


@pytest.fixture(scope="module")
def params(config):
    p = jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(0))
    return jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x, p)


ENGINE_OPTIONS = dict(num_pages=128, page_size=4, prefill_chunk=16, max_reason_tokens=6, batch_size=4)


@pytest.fixture(scope="module")
def engine(config, params, tokenizer):
    return Engine(config, params, tokenizer, **ENGINE_OPTIONS)


@pytest.fixture
def fresh(engine):
    """The module's engine with an empty bank (compiled programs are shared)."""
    engine.bank = MemoryBank.for_model(engine.config, engine.params)
    engine.prompts = {"query": "", "document": ""}
    return engine


# --- compression and embeddings ---------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _row_forward(config, params, tokens, example, segment, kind, latent_index):
    out = model.forward(
        config,
        params,
        tokens,
        layout.TokenMeta(example, segment, kind),
        kv_index=latent_index.reshape(1, -1),
        compute_logits=False,
    )
    return out.keys[:, 0], out.values[:, 0], model.pool_latents(config, params, out.hidden, latent_index)[0]


def test_compressed_memories_equal_those_of_a_packed_training_row(fresh):
    e = fresh
    ids = e.compress([DOCS[0], LONG])
    long_tokens = e.tokenizer.encode(LONG)
    P = e.config.max_segment_len
    assert len(ids[0]) == 1 and len(ids[1]) == -(-len(long_tokens) // P) == 2
    # The same segments inside one packed training row: a reader example, then the long document.
    segments = [e.tokenizer.encode(DOCS[0]), long_tokens[:P], long_tokens[P:]]
    examples = [
        layout.example_pieces(segments[:1], e.tokenizer.encode(QUESTION), e.latent_ids, P),
        layout.example_pieces(segments[1:], [], e.latent_ids, P),
    ]
    row = layout.pack_rows(examples, 96)[0]
    keys, values, embeddings = _row_forward(e.config, e.params, *(jnp.asarray(a)[None] for a in row))
    K = e.config.num_latents
    got_k, got_v = e.bank.kv(ids[0] + ids[1])
    for n in range(3):
        np.testing.assert_allclose(got_k[n], keys[:, n * K : (n + 1) * K], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_v[n], values[:, n * K : (n + 1) * K], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(e.bank.get((ids[0] + ids[1])[n]).embedding, embeddings[n], rtol=1e-5, atol=1e-5)
    assert e.bank.get(ids[1][1]).text == e.tokenizer.decode(long_tokens[P:])
    # the embedding of a text is the embedding its compression stored
    np.testing.assert_allclose(e.embed(DOCS[0]), e.bank.get(ids[0][0]).embedding, rtol=1e-5, atol=1e-6)


def test_compress_rejects_an_empty_text(fresh):
    with pytest.raises(ValueError, match="text 1 is empty: nothing to compress"):
        fresh.compress([DOCS[0], ""])
    assert len(fresh.bank) == 0
    with pytest.raises(ValueError, match="text 0 is empty: nothing to embed"):
        fresh.embed([""])


def test_encode_follows_sentence_transformers_conventions(fresh):
    e = fresh
    many = e.encode(DOCS)
    assert many.shape == (3, e.config.hidden_size) and isinstance(many, np.ndarray)
    np.testing.assert_allclose(np.linalg.norm(many, axis=-1), 1.0, rtol=1e-5)
    one = e.encode(DOCS[1])
    assert one.shape == (e.config.hidden_size,)
    np.testing.assert_allclose(one, many[1], rtol=1e-5, atol=1e-6)
    assert isinstance(e.encode(DOCS, convert_to_numpy=False), jax.Array)
    instructed = e.embed(DOCS, instruction="Find: ")
    assert not np.allclose(instructed, many, atol=1e-3)
    np.testing.assert_allclose(e.encode(DOCS, prompt="Find: "), instructed, rtol=1e-5, atol=1e-6)
    e.prompts = {"query": "Find: ", "document": ""}
    np.testing.assert_allclose(e.encode_query(DOCS), instructed, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e.encode_document(DOCS), many, rtol=1e-5, atol=1e-6)
    sim = e.similarity(many, one)
    assert sim.shape == (3, 1) and e.similarity_fn_name == "cosine"
    np.testing.assert_allclose(sim[:, 0], many @ one, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"prompt_name 'passage' is not one of \['document', 'query'\]"):
        e.encode(DOCS, prompt_name="passage")


@pytest.mark.slow
def test_reasoned_embedding_is_the_embedding_of_query_plus_its_trace(fresh):
    e = fresh
    segments = [e.tokenizer.encode(QUESTION)[:5], e.tokenizer.encode(DOCS[2])[:7]]
    embeddings, traces = e.embed_with_reasoning_tokens(segments)
    assert all(len(t) <= e.max_reason_tokens for t in traces)
    closed = [s + t + ([] if t[-1:] == [e.eor_id] else [e.eor_id]) for s, t in zip(segments, traces)]
    np.testing.assert_allclose(embeddings, e.embed_tokens(closed), rtol=1e-4, atol=1e-5)
    no_reason = e.embed_tokens(segments)
    assert not np.allclose(embeddings, no_reason, atol=1e-3)
    texts = [e.tokenizer.decode(s) for s in segments]
    assert [e.tokenizer.encode(t) for t in texts] == segments
    np.testing.assert_allclose(e.embed(texts, reason=True), embeddings, rtol=1e-5, atol=1e-6)


# --- generation, search, RAG ------------------------------------------------------------


@pytest.mark.slow
def test_generate_reads_the_named_memories(fresh):
    e = fresh
    ids = e.compress(DOCS)
    with_memory = e.generate(QUESTION, memories=ids[0], max_new_tokens=6)
    # the same request through the decoder, the memory handed over by value
    settings = e.decoder.settings(6, stop_token_ids=(e.eos_id,))
    tokens = e.decoder.generate(
        [e.tokenizer.encode(QUESTION)], settings, memories=[["m"]], memory_source=lambda _: e.bank.kv(ids[0])
    )[0]
    assert with_memory == e.tokenizer.decode([t for t in tokens if t != e.eos_id])
    without = e.generate(QUESTION, max_new_tokens=6)
    assert without != with_memory
    per_row = e.generate([QUESTION, QUESTION], memories=[ids[0], []], max_new_tokens=6)
    assert per_row == [with_memory, without]
    with pytest.raises(KeyError, match=r"unknown memory id\(s\) \[999\]"):
        e.generate(QUESTION, memories=[999])
    with pytest.raises(ValueError, match="1 memory lists for 2 prompts"):
        e.generate([QUESTION, QUESTION], memories=[[0]])
    with pytest.raises(ValueError, match=r"one list of ids for every prompt, or one list per prompt; got \[0, \[1\]\]"):
        e.generate([QUESTION, QUESTION], memories=[0, [1]])
    with pytest.raises(ValueError, match="stop token '<nope>' is not in the tokenizer"):
        e.generate(QUESTION, stop_tokens=["<nope>"])


def test_a_replaced_memory_is_not_served_from_stale_pages(fresh):
    e = fresh
    (a,), (b,) = e.compress(DOCS[:2])
    before = e.generate(QUESTION, memories=[a], max_new_tokens=6)  # a's pages are now cached in the pool
    other = e.generate(QUESTION, memories=[b], max_new_tokens=6)
    assert before != other
    e.replace_memory(a, DOCS[1])
    assert e.generate(QUESTION, memories=[a], max_new_tokens=6) == other
    e.remove_memories([a])
    with pytest.raises(KeyError, match=rf"unknown memory id\(s\) \[{a}\]"):
        e.generate(QUESTION, memories=[a])
    with pytest.raises(ValueError, match="replacement text has .* tokens; one memory holds at most max_segment_len=16"):
        e.replace_memory(b, LONG)


def test_stream_yields_the_text_of_generate(fresh):
    e = fresh
    ids = e.compress(DOCS[:1])[0]
    pieces = list(e.stream(QUESTION, memories=ids, max_new_tokens=6, steps_per_chunk=2))
    assert len(pieces) >= 2
    assert "".join(pieces) == e.generate(QUESTION, memories=ids, max_new_tokens=6)


def test_stream_holds_back_a_character_cut_between_chunks(fresh, monkeypatch):
    e = fresh
    ids = e.tokenizer.encode("café au lait")
    cut = next(i for i in range(1, len(ids)) if e.tokenizer.decode(ids[:i]).endswith("\ufffd"))  # inside 'é'
    monkeypatch.setattr(e.decoder, "stream", lambda *args, **kwargs: iter([[ids[:cut]], [ids[cut:]]]))
    pieces = list(e.stream(QUESTION, max_new_tokens=len(ids)))
    assert "".join(pieces) == "café au lait" and not any("\ufffd" in p for p in pieces)


@pytest.mark.slow
def test_search_and_rag(fresh):
    e = fresh
    with pytest.raises(ValueError, match="the memory bank is empty"):
        e.search(QUESTION)
    ids = [i for (i,) in e.compress(DOCS)]
    hits = e.search(DOCS[1], top_k=2)
    assert [h.id for h in hits][0] == ids[1] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].text == e.tokenizer.decode(e.tokenizer.encode(DOCS[1]))
    query = e.encode_query(DOCS[1])
    assert hits[1].score == pytest.approx(float(query @ e.bank.get(hits[1].id).embedding), abs=1e-5)
    assert hits[0].score >= hits[1].score
    answer = e.rag(QUESTION, top_k=2, max_new_tokens=6)
    expected = e.search(QUESTION, top_k=2)
    assert answer.memory_ids == [h.id for h in expected]
    assert answer.scores == pytest.approx([h.score for h in expected])
    assert answer.answer == e.generate(QUESTION, memories=answer.memory_ids, max_new_tokens=6)
    reasoned = e.rag(QUESTION, top_k=1, reason=True, max_new_tokens=6)
    assert reasoned.memory_ids == [e.search(QUESTION, top_k=1, reason=True)[0].id]


# --- opening models ---------------------------------------------------------------------


def _same_params(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_from_pretrained_opens_an_hf_export(tmp_path, config, params, tokenizer, engine):
    hf.save_pretrained(config, params, tmp_path / "export", tokenizer)
    opened = Engine.from_pretrained(tmp_path / "export", **ENGINE_OPTIONS)
    assert opened.config.replace(rope_scaling=None) == config
    _same_params(opened.params, params)
    np.testing.assert_allclose(opened.embed(DOCS[0]), engine.embed(DOCS[0]), rtol=1e-6)


def _write_run(workdir: Path, config: ModelConfig, tokenizer: Tokenizer, states: dict[int, dict]) -> None:
    """A training run directory as grc_jax.train writes it."""
    import orbax.checkpoint as ocp

    (workdir / "model_config.json").parent.mkdir(parents=True, exist_ok=True)
    (workdir / "model_config.json").write_text(json.dumps(dataclasses.asdict(config)))
    tokenizer.with_latents(config.num_latents, config.vocab_size).save(workdir / "tokenizer")
    manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
    for step, state in states.items():
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"position": step})),
            force=True,
        )
    manager.wait_until_finished()
    manager.close()


def test_from_pretrained_restores_a_training_run(tmp_path, config, params, tokenizer):
    doubled = jax.tree.map(lambda x: 2 * x, params)
    state = lambda p: {
        "step": jnp.zeros((), jnp.int32),
        "params": p,
        "opt_state": {"mu": p},
        "rng": jnp.zeros(2, jnp.uint32),
        "first_bad_step": jnp.full((), -1, jnp.int32),
    }
    _write_run(tmp_path, config, tokenizer, {3: state(params), 7: state(doubled)})
    latest = Engine.from_pretrained(tmp_path, **ENGINE_OPTIONS)
    assert latest.config == config
    _same_params(latest.params, doubled)
    _same_params(Engine.from_pretrained(tmp_path, step=3, **ENGINE_OPTIONS).params, params)
    with pytest.raises(ValueError, match=r"no step 5; steps: \[3, 7\]"):
        Engine.from_pretrained(tmp_path, step=5)


def test_opening_bad_directories_and_tokens_gives_clear_errors(tmp_path, config, params, tokenizer):
    with pytest.raises(FileNotFoundError, match="neither an HF model directory"):
        Engine.from_pretrained(tmp_path)
    (tmp_path / "model_config.json").write_text(json.dumps(dataclasses.asdict(config)))
    tokenizer.save(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no checkpoints directory"):
        Engine.from_pretrained(tmp_path)
    (tmp_path / "model_config.json").write_text(json.dumps({**dataclasses.asdict(config), "n_experts": 2}))
    with pytest.raises(ValueError, match=r"unknown ModelConfig fields \['n_experts'\]"):
        Engine.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in the tokenizer; pass eos_token="):
        Engine(config, params, tokenizer, eos_token="<nope>")
    no_eor = Engine(config, params, tokenizer, eor_token=None, **ENGINE_OPTIONS)
    with pytest.raises(ValueError, match="reason=True needs an end-of-reasoning token"):
        no_eor.embed(QUESTION, reason=True)


# --- the memory bank --------------------------------------------------------------------

SPEC = BankSpec(num_layers=2, num_latents=4, num_kv_heads=2, head_dim=8, embed_dim=32)


def _memories(n, spec=SPEC, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, *spec.memory_shape)
    emb = rng.standard_normal((n, spec.embed_dim)).astype(np.float32)
    return (
        rng.standard_normal(shape).astype(np.float32),
        rng.standard_normal(shape).astype(np.float32),
        emb / np.linalg.norm(emb, axis=-1, keepdims=True),
    )


def _assert_same_bank(a: MemoryBank, b: MemoryBank):
    assert a.ids == b.ids and a.spec == b.spec
    for i in a.ids:
        x, y = a.get(i), b.get(i)
        assert x.text == y.text and x.version == y.version
        for f in ("keys", "values", "embedding"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))


def test_bank_add_remove_replace_and_round_trip(tmp_path):
    bank = MemoryBank(SPEC)
    ids = bank.add(*_memories(3), texts=["a", "b", None])
    assert ids == [0, 1, 2]
    bank.remove([1])
    k, v, e = _memories(1, seed=1)
    bank.replace(2, k[0], v[0], e[0], "c")
    assert bank.get(2).version == 1 and bank.get(2).text == "c"
    np.testing.assert_array_equal(bank.kv([2])[0][0], k[0])
    found, scores = bank.search(e, top_k=5)
    assert found[0].tolist() == [2, 0] and scores[0, 0] == pytest.approx(1.0)
    loaded = MemoryBank.load(bank.save(tmp_path / "bank.npz"), expect=SPEC)
    _assert_same_bank(bank, loaded)
    assert loaded.add(*_memories(1)) == [3]  # removed ids are never handed out again


def test_bank_keeps_bfloat16_memories_bit_exact(tmp_path):
    spec = dataclasses.replace(SPEC, dtype="bfloat16")
    bank = MemoryBank(spec)
    bank.add(*_memories(2, spec))
    assert bank.get(0).keys.dtype == ml_dtypes.bfloat16
    _assert_same_bank(bank, MemoryBank.load(bank.save(tmp_path / "b.npz")))


def test_a_crash_mid_save_leaves_the_previous_bank_readable(tmp_path, monkeypatch):
    path = tmp_path / "bank.npz"
    bank = MemoryBank(SPEC)
    bank.add(*_memories(2), texts=["x", "y"])
    bank.save(path)
    saved = MemoryBank.load(path)
    bank.add(*_memories(3, seed=5))

    def crash(file, arrays):
        file.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(memory_bank_module, "_write_npz", crash)
    with pytest.raises(OSError, match="disk full"):
        bank.save(path)
    _assert_same_bank(MemoryBank.load(path), saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.npz"]  # no temporary file left behind


def test_bank_bad_input_and_mismatch_errors(tmp_path, fresh):
    bank = MemoryBank(SPEC)
    keys, values, emb = _memories(2)
    with pytest.raises(ValueError, match=r"keys do not match the bank: num_latents=3 \(the bank holds 4\)"):
        bank.add(keys[:, :, :3], values[:, :, :3], emb)
    with pytest.raises(ValueError, match=r"embeddings must be \[2, 32\], got \[2, 16\]"):
        bank.add(keys, values, emb[:, :16])
    bank.add(keys, values, emb)
    for call in (
        lambda: bank.remove([0, 9]),
        lambda: bank.get(9),
        lambda: bank.kv([9]),
        lambda: bank.replace(9, keys[0], values[0], emb[0]),
    ):
        with pytest.raises(KeyError, match=r"unknown memory id\(s\) \[9\]; the bank holds 2 memories"):
            call()
    assert len(bank) == 2  # the failed remove removed nothing
    path = bank.save(tmp_path / "bank.npz")
    other = BankSpec(num_layers=3, num_latents=8, num_kv_heads=2, head_dim=8, embed_dim=32)
    with pytest.raises(ValueError, match=r"does not match the model: num_layers=2 vs 3, num_latents=4 vs 8"):
        MemoryBank.load(path, expect=other)
    odd = dataclasses.replace(SPEC, num_kv_heads=1, head_dim=16)
    MemoryBank(odd).save(tmp_path / "odd.npz")
    with pytest.raises(ValueError, match=r"num_kv_heads=1 vs 2, head_dim=16 vs 8"):
        fresh.load_bank(tmp_path / "odd.npz")
    with pytest.raises(ValueError, match=r"memory bank does not match the model: num_latents=8 vs 4"):
        Engine(fresh.config, fresh.params, fresh.tokenizer, bank=MemoryBank(dataclasses.replace(SPEC, num_latents=8)))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz: not a memory bank file"):
        MemoryBank.load(tmp_path / "junk.npz")
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:200])  # a zip cut short
    with pytest.raises(ValueError, match="cut.npz: not a memory bank file"):
        MemoryBank.load(tmp_path / "cut.npz")
    with np.load(path) as data:
        arrays = dict(data)
    np.savez(tmp_path / "list_meta.npz", **{**arrays, "meta": np.asarray("[1, 2]")})
    with pytest.raises(ValueError, match=r"list_meta.npz: not a memory bank file \(bad meta"):
        MemoryBank.load(tmp_path / "list_meta.npz")
    with pytest.raises(FileNotFoundError, match="no memory bank file"):
        MemoryBank.load(tmp_path / "missing.npz")


def test_a_bank_of_another_model_is_refused(tmp_path, fresh, config, params, tokenizer):
    fresh.compress(DOCS[:2])
    path = fresh.bank.save(tmp_path / "bank.npz")
    other_weights = jax.tree.map(lambda x: x * 1.01, params)
    with pytest.raises(ValueError, match=r"bank.npz does not match the model: weights=\w+ vs \w+"):
        Engine(config, other_weights, tokenizer, **ENGINE_OPTIONS).load_bank(path)
    longer = dataclasses.replace(config, max_segment_len=2 * config.max_segment_len)
    with pytest.raises(ValueError, match=rf"max_segment_len={config.max_segment_len} vs {2 * config.max_segment_len}"):
        MemoryBank.load(path, expect=BankSpec.of(longer, params))
    with pytest.raises(ValueError, match=r"rope=.*10000.* vs .*500000"):
        MemoryBank.load(path, expect=BankSpec.of(dataclasses.replace(config, rope_theta=500000.0), params))
    fresh.load_bank(path)  # its own model reads it
    assert len(fresh.bank) == 2


def test_a_format_1_bank_still_loads(tmp_path):
    bank = MemoryBank(SPEC)
    bank.add(*_memories(2), texts=["a", "b"])
    path = bank.save(tmp_path / "bank.npz")
    with np.load(path) as data:
        arrays = dict(data)
    meta = json.loads(str(arrays["meta"]))
    meta["format_version"] = 1
    meta["spec"] = {
        k: meta["spec"][k] for k in ("num_layers", "num_latents", "num_kv_heads", "head_dim", "embed_dim", "dtype")
    }
    np.savez(tmp_path / "v1.npz", **{**arrays, "meta": np.asarray(json.dumps(meta))})
    full = dataclasses.replace(SPEC, max_segment_len=16, pooling="mean", weights="0123456789abcdef")
    _assert_same_bank(bank, MemoryBank.load(tmp_path / "v1.npz", expect=full))


def test_bank_search_is_cosine_for_embeddings_of_any_length():
    bank = MemoryBank(SPEC)
    keys, values, _ = _memories(2)
    query = np.eye(SPEC.embed_dim, dtype=np.float32)[:1]
    far = 10 * np.eye(SPEC.embed_dim, dtype=np.float32)[1] + 3 * query[0]  # long, cosine 0.29
    near = query[0] + 0.1 * np.eye(SPEC.embed_dim, dtype=np.float32)[2]  # short, cosine 0.995
    bank.add(keys, values, np.stack([near, far]))
    ids, scores = bank.search(query, top_k=2)
    assert ids[0].tolist() == [0, 1]
    np.testing.assert_allclose(scores[0], [1 / np.sqrt(1.01), 3 / np.sqrt(109)], rtol=1e-6)


def test_a_saved_bank_gets_the_usual_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = MemoryBank(SPEC).save(tmp_path / "bank.npz")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        path.chmod(0o640)
        MemoryBank(SPEC).save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640  # an existing file keeps its mode
    finally:
        os.umask(old)


def test_an_engine_multiplies_in_float32_whatever_the_training_did(config, params, tokenizer):
    # bfloat16 matmul operands are a training setting; decode would round the weights every step.
    engine = Engine(config.replace(matmul_dtype="bfloat16"), params, tokenizer, **ENGINE_OPTIONS)
    assert engine.config == config and engine.config.matmul_dtype == "float32"
