"""Memory priors (docs/design.md section 8): the question-segment layout, the two-phase training
forward against the one-pass one, train/serve identity of the priors, the constructed routing
case on attention weights, and the inference option down to the paged kernel's page bias."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax import layout, losses, model, priors
from grc_jax.config import ModelConfig
from grc_jax.data import builder, demo_world
from grc_jax.data.builder import SEG_DOCUMENT, SEG_QUESTION, BuildConfig, TokenizedRecord
from grc_jax.eval import world
from grc_jax.eval.attention import attention_probabilities
from grc_jax.eval.distractors import with_distractors
from grc_jax.inference import Engine
from grc_jax.tokenizer import Tokenizer

P, K = 16, 4
WEIGHTS = {"gen": 1.0, "rep": 1.0, "comp": 1.0}
DOCS = [
    "Zorvak lives in Quarn and keeps an owl.",
    "Belna is a glassblower from Ostreth.",
    "The river Quarn floods every spring.",
    "Mirel sells bread in Tavik.",
    "Dapa keeps a goat.",
]
QUESTION = "Where does Zorvak live?"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(demo_world.train_tokenizer((DOCS + [QUESTION, " Quarn"]) * 3, vocab_size=360))


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
        num_latents=K,
        max_segment_len=P,
    )


@pytest.fixture(scope="module")
def params(config):
    p = jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(0))
    return jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x, p)  # O(1) activations


@pytest.fixture(scope="module")
def engine(config, params, tokenizer):
    return Engine(config, params, tokenizer, num_pages=128, page_size=4, prefill_chunk=16, batch_size=8)


def build_config(config: ModelConfig, **overrides) -> BuildConfig:
    settings = dict(
        max_segment_len=P,
        num_latents=K,
        latent_ids=config.latent_token_ids,
        row_len=256,
        max_segments_per_row=10,
        bos_id=1,
        eos_id=2,
        eor_id=3,
        pad_id=0,
        max_negatives=4,
        reader_distractors=3,
        question_segments=True,
    )
    return BuildConfig(**{**settings, **overrides})


def records(tok: Tokenizer) -> list[TokenizedRecord]:
    """Two QA records (the reader sees the positive and up to 3 look-alikes) and a text record."""
    enc = lambda t: tok.encode(t)[:P]
    qa = [
        TokenizedRecord(
            "r:1",
            query=enc("Who keeps an owl?"),
            positive=enc(DOCS[0]),
            negatives=tuple(enc(d) for d in DOCS[1:4]),
            question=enc(QUESTION),
            answer=enc(" Quarn"),
            positive_doc_id=0,
            negative_doc_ids=(1, 2, 3),
        ),
        TokenizedRecord(
            "r:2",
            positive=enc(DOCS[3]),
            negatives=(enc(DOCS[4]),),
            question=enc("Who sells bread?"),
            answer=enc(" Mirel"),
            positive_doc_id=3,
            negative_doc_ids=(4,),
        ),
        TokenizedRecord("r:3", text=enc(DOCS[2])),
    ]
    return qa


def batch_of(config, tok, **overrides) -> dict[str, jax.Array]:
    cfg = build_config(config, **overrides)
    units = [builder.build_unit(r, cfg, np.random.default_rng(i)) for i, r in enumerate(records(tok))]
    return {k: jnp.asarray(v) for k, v in builder.pack_units(units, cfg).items()}


def meta_of(batch) -> layout.TokenMeta:
    return layout.TokenMeta(batch["example"], batch["segment"], batch["kind"])


# --- layout ---------------------------------------------------------------------------------


def test_question_segment_is_its_own_example_and_names_the_readers_memories(config, tokenizer):
    batch = {k: np.asarray(v) for k, v in batch_of(config, tokenizer).items()}
    kind, q_of = batch["seg_kind"][0], batch["seg_question"][0]
    questions = np.flatnonzero(kind == SEG_QUESTION)
    assert len(questions) == 2  # one per QA record
    example_of_slot = batch["example"][0][batch["seg_latent_index"][0, :, 0]]
    mask = np.asarray(layout.attention_mask(meta_of({k: jnp.asarray(v) for k, v in batch.items()})))[0]
    readers = np.flatnonzero(batch["kind"][0] == layout.READER)
    for q in questions:
        memories = np.flatnonzero(q_of == q)
        # The reader's memories: the document segments of one example (positive + shown negatives).
        assert len({example_of_slot[m] for m in memories}) == 1 and (kind[memories] == SEG_DOCUMENT).all()
        assert example_of_slot[q] not in {example_of_slot[m] for m in memories}
        # No reader sees the question's latents; the question's text is not trained on.
        assert not mask[np.ix_(readers, batch["seg_latent_index"][0, q])].any()
        text = (batch["segment"][0] == q + 1) & (batch["kind"][0] == layout.TEXT)
        assert batch["gen_weight"][0][text].sum() == 0
    assert (q_of[(kind != SEG_DOCUMENT)] == -1).all()
    # Off (the default), the batch is as before: no question segments, no seg_question.
    plain = batch_of(config, tokenizer, question_segments=False)
    assert "seg_question" not in plain and not (np.asarray(plain["seg_kind"]) == SEG_QUESTION).any()


# --- the two-phase training forward -----------------------------------------------------------


def test_two_phase_forward_without_bias_equals_the_one_pass_forward(config, params, tokenizer):
    batch = batch_of(config, tokenizer)
    one = model.forward(config, params, batch["tokens"], meta_of(batch))
    two, emb, prior = priors.prior_forward(
        config, params, batch["tokens"], meta_of(batch), batch["seg_latent_index"], batch["seg_question"], None
    )
    np.testing.assert_array_equal(np.asarray(two.logits), np.asarray(one.logits))
    np.testing.assert_array_equal(
        np.asarray(emb), np.asarray(model.pool_latents(config, params, one.hidden, batch["seg_latent_index"]))
    )
    assert not np.asarray(prior).any()


def test_priors_with_one_memory_per_reader_leave_losses_and_gradients_unchanged(config, params, tokenizer):
    # Every reader sees its positive only: each prior is log_softmax of one score, exactly 0.
    batch = batch_of(config, tokenizer, reader_distractors=0)
    one_pass = jax.value_and_grad(lambda p: losses.grc_loss(config, p, batch, WEIGHTS, 0.05), has_aux=True)
    two_phase = jax.value_and_grad(
        lambda p: losses.grc_loss(config, p, batch, WEIGHTS, 0.05, prior_temperature=0.05), has_aux=True
    )
    (_, m1), g1 = one_pass(params)
    (_, m2), g2 = two_phase(params)
    assert float(m1["comp_tokens"]) > 0 and float(m1["rep_queries"]) > 0
    for key in ("loss", "loss_gen", "loss_rep", "loss_comp"):
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=1e-6, atol=1e-6)
    # The embeddings' gradient arrives in two sums (through each phase) instead of one: float32
    # summation order, ~5e-6 on entries of ~0.1.
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


def test_priors_change_only_the_readers_and_train_the_embeddings(config, params, tokenizer):
    batch = batch_of(config, tokenizer)
    one = model.forward(config, params, batch["tokens"], meta_of(batch))
    two, _, prior = priors.prior_forward(
        config, params, batch["tokens"], meta_of(batch), batch["seg_latent_index"], batch["seg_question"], 0.05
    )
    reader = np.asarray(batch["kind"]) == layout.READER
    np.testing.assert_array_equal(np.asarray(two.logits)[~reader], np.asarray(one.logits)[~reader])
    assert np.abs(np.asarray(two.logits)[reader] - np.asarray(one.logits)[reader]).max() > 1e-3
    # Each reader's priors are a log-distribution over its memories.
    q_of = np.asarray(batch["seg_question"])[0]
    for q in set(q_of[q_of >= 0]):
        np.testing.assert_allclose(np.exp(np.asarray(prior)[0][q_of == q]).sum(), 1.0, rtol=1e-5)

    # The compressive loss reaches the embeddings through the prior: the question segment's
    # latents get a gradient from it alone (no other loss touches them).
    def comp(embeddings):
        p = priors.segment_priors(embeddings, batch["seg_question"], 0.05)
        out = model.forward(
            config, params, batch["tokens"], meta_of(batch), memory_bias=priors.latent_key_bias(p, meta_of(batch))
        )
        return losses.token_cross_entropy(out.logits, batch["targets"], batch["comp_weight"])[0]

    emb = model.pool_latents(config, params, one.hidden, batch["seg_latent_index"])
    grad = np.asarray(jax.grad(comp)(emb))[0]
    assert np.abs(grad[np.asarray(batch["seg_kind"])[0] == SEG_QUESTION]).max() > 0


def test_training_priors_equal_inference_priors(config, params, tokenizer, engine):
    batch = batch_of(config, tokenizer)
    _, _, prior = priors.prior_forward(
        config, params, batch["tokens"], meta_of(batch), batch["seg_latent_index"], batch["seg_question"], 0.05
    )
    tokens, latent_index = np.asarray(batch["tokens"])[0], np.asarray(batch["seg_latent_index"])[0]
    q_of, prior = np.asarray(batch["seg_question"])[0], np.asarray(prior)[0]
    text_of = lambda slot: [
        int(t)
        for t in tokens[: latent_index[slot, 0]][np.asarray(batch["segment"])[0][: latent_index[slot, 0]] == slot + 1]
    ]
    for q in sorted(set(q_of[q_of >= 0])):
        memories = np.flatnonzero(q_of == q)
        # Inference: the question and the memories embedded alone, as Engine.generate does.
        question = engine.embed_tokens([text_of(q)])[0]
        mem = engine.embed_tokens([text_of(m) for m in memories])
        np.testing.assert_allclose(
            np.asarray(priors.memory_prior(question, mem, 0.05)), prior[memories], rtol=1e-4, atol=1e-4
        )


# --- routing: the constructed case ------------------------------------------------------------


def test_a_reader_with_priors_attends_almost_only_to_the_right_memory(config, params, tokenizer, engine):
    enc = tokenizer.encode
    right = enc(QUESTION)  # the right memory's text is the question's: cosine exactly 1
    distractors = [enc(d)[:P] for d in DOCS[1:5]]
    question_emb = engine.embed_tokens([right])[0]
    mem_emb = engine.embed_tokens([right] + distractors)
    cos = mem_emb @ question_emb
    assert cos[0] == pytest.approx(1.0, abs=1e-5) and cos[1:].max() < 1.0 - 0.02  # distractors further away
    tau = 0.002
    prior = np.asarray(priors.memory_prior(question_emb, mem_emb, tau))
    row = layout.pack_rows(
        [layout.example_pieces([right] + distractors, enc(QUESTION + " It"), config.latent_token_ids, P)], 160
    )[0]
    meta = layout.TokenMeta(*(jnp.asarray(getattr(row, f))[None] for f in ("example", "segment", "kind")))
    bias = priors.latent_key_bias(jnp.asarray(prior)[None], meta)
    probs_on = np.asarray(attention_probabilities(config, params, jnp.asarray(row.tokens)[None], meta, bias))
    probs_off = np.asarray(attention_probabilities(config, params, jnp.asarray(row.tokens)[None], meta))
    readers = np.flatnonzero((row.kind == layout.READER) & (row.example > 0))  # padding is READER too
    right_keys, wrong_keys = row.latent_index[0], row.latent_index[1:].reshape(-1)

    def share_of_right(probs):  # [layers, heads, readers]: the right memory's share of all memory weight
        on_right = probs[:, 0][:, :, readers][..., right_keys].sum(-1)
        on_wrong = probs[:, 0][:, :, readers][..., wrong_keys].sum(-1)
        return on_right / (on_right + on_wrong)

    assert share_of_right(probs_on).min() > 0.99
    assert share_of_right(probs_off).mean() < 0.5  # without the prior the reader spreads over all five
    # With one memory the prior is 0 and the output is the prior-free output, exactly.
    alone = layout.pack_rows([layout.example_pieces([right], enc(QUESTION + " It"), config.latent_token_ids, P)], 64)[0]
    meta1 = layout.TokenMeta(*(jnp.asarray(getattr(alone, f))[None] for f in ("example", "segment", "kind")))
    prior1 = priors.memory_prior(question_emb, mem_emb[:1], tau)
    assert float(prior1[0]) == 0.0
    with_prior = model.forward(
        config,
        params,
        jnp.asarray(alone.tokens)[None],
        meta1,
        memory_bias=priors.latent_key_bias(jnp.asarray(prior1)[None], meta1),
    )
    without = model.forward(config, params, jnp.asarray(alone.tokens)[None], meta1)
    np.testing.assert_array_equal(np.asarray(with_prior.logits), np.asarray(without.logits))


# --- inference ---------------------------------------------------------------------------------


def test_generate_with_priors_reads_like_the_forward_pass_with_the_same_bias(engine, config, params, tokenizer):
    engine.bank = type(engine.bank).for_model(config, params)
    ids = [i for row in engine.compress(DOCS[:3]) for i in row]
    prompt = tokenizer.encode(QUESTION)
    tau = 0.05
    bias = engine.memory_priors([prompt], [ids], True, tau)[0]
    question_emb = engine.embed_tokens([prompt])[0]
    mem_emb = engine.embed_tokens([tokenizer.encode(d)[:P] for d in DOCS[:3]])
    np.testing.assert_allclose(bias, np.asarray(priors.memory_prior(question_emb, mem_emb, tau)), rtol=1e-5, atol=1e-5)
    # The decoder's first new token's logits equal the teacher-forced forward's with that bias.
    settings = engine.decoder.settings(3, record_logits=True)
    _, logits = engine.decoder.generate_with_logits(
        [prompt], settings, memories=engine._pool_keys([ids]), memory_source=engine._memory_source, memory_bias=[bias]
    )
    row = layout.pack_rows(
        [layout.example_pieces([tokenizer.encode(d)[:P] for d in DOCS[:3]], prompt, config.latent_token_ids, P)], 96
    )[0]
    meta = layout.TokenMeta(*(jnp.asarray(getattr(row, f))[None] for f in ("example", "segment", "kind")))
    out = model.forward(
        config,
        params,
        jnp.asarray(row.tokens)[None],
        meta,
        memory_bias=priors.latent_key_bias(jnp.asarray(bias, jnp.float32)[None], meta),
    )
    last = int(np.flatnonzero((row.kind == layout.READER) & (row.example > 0))[-1])  # the prompt's last token
    np.testing.assert_allclose(logits[0][0], np.asarray(out.logits)[0, last, : config.vocab_size], atol=2e-4)
    plain = model.forward(config, params, jnp.asarray(row.tokens)[None], meta)
    assert np.abs(np.asarray(plain.logits)[0, last] - np.asarray(out.logits)[0, last]).max() > 1e-3
    # Caller scores go through the same log_softmax(scores / tau); no prior is the prior-free path.
    scores = [[0.3, -0.1, 0.9]]
    expected = np.asarray(priors.log_prior(np.asarray(scores[0], np.float32) / tau))
    np.testing.assert_allclose(engine.memory_priors([prompt], [ids], scores, tau)[0], expected, rtol=1e-6)
    assert engine.memory_priors([prompt], [ids], False, tau) is None
    # Only score differences count (a softmax over the memories); a flat prior is -log 3 on each.
    flat = engine.generate(QUESTION, memories=ids, max_new_tokens=4, memory_prior=[[0.0, 0.0, 0.0]])
    assert flat == engine.generate(QUESTION, memories=ids, max_new_tokens=4, memory_prior=[[5.0, 5.0, 5.0]])
    np.testing.assert_allclose(
        engine.memory_priors([prompt], [ids], [[5.0, 5.0, 5.0]], tau)[0], [-np.log(3)] * 3, rtol=1e-6
    )
    with pytest.raises(ValueError, match="one score per memory"):
        engine.generate(QUESTION, memories=ids, memory_prior=[[0.1, 0.2]])
    with pytest.raises(ValueError, match="one value per memory"):
        engine.decoder.generate(
            [prompt],
            settings,
            memories=engine._pool_keys([ids]),
            memory_source=engine._memory_source,
            memory_bias=[[0.0]],
        )


def test_distractors_lookalike_and_random():
    corpus = [f"doc {i}" for i in range(20)]
    positive, negatives = "doc 0", ["doc 1", "doc 2", "doc 0", "doc 1"]
    rng = np.random.default_rng(0)
    look = with_distractors(positive, negatives, corpus, world.NUM_DISTRACTORS, rng)  # the held-out evaluation's
    assert {"doc 0", "doc 1", "doc 2"} <= set(look) and len(look) == len(set(look)) == 5  # both look-alikes, topped up
    rand = with_distractors(positive, negatives, corpus, 4, rng, lookalike=False)
    assert "doc 0" in rand and len(set(rand)) == 5
    assert with_distractors(positive, negatives, corpus, 0, rng, lookalike=False) == ["doc 0"]
    assert sorted(with_distractors(positive, negatives, corpus[:3], 4, rng, lookalike=False)) == corpus[:3]


def test_the_training_switch_runs_the_two_phase_step(tmp_path):
    from grc_jax import train, train_config

    world_dir = tmp_path / "world"
    demo_world.write_demo_world(str(world_dir), seed=0, num_entities=40, num_heldout=8)
    c = train_config.defaults()
    values = {
        "model.hidden_size": 32,
        "model.intermediate_size": 64,
        "model.num_layers": 2,
        "model.num_heads": 4,
        "model.num_kv_heads": 2,
        "model.head_dim": 8,
        "model.num_latents": 4,
        "model.max_segment_len": 96,
        "data.row_len": 384,
        "data.max_segments_per_row": 10,
        "data.max_negatives": 2,
        "data.reader_distractors": 2,
        "train.steps": 3,
        "train.global_batch": 8,
        "train.warmup_steps": 1,
        "checkpoint.every": 3,
        "log_every": 1,
        "data.train_files": str(world_dir / "train.jsonl"),
        "data.tokenizer": str(world_dir),
        "train.memory_prior": True,
    }
    for key, value in values.items():
        section, leaf = key.split(".") if "." in key else (None, key)
        (c[section] if section else c)[leaf] = value
    result = train.train_and_evaluate(c, tmp_path / "run")
    assert [h["step"] for h in result["history"]] == [1, 2, 3]
    assert all(np.isfinite(h["loss"]) and h["comp_tokens"] > 0 for h in result["history"])
    c.train.prior_temperature = 0.0
    with pytest.raises(ValueError, match="train.prior_temperature"):
        train.train_and_evaluate(c, tmp_path / "bad")


@pytest.mark.parametrize("setting", [None, True, False])
def test_the_held_out_evaluation_reads_as_eval_memory_prior_says(tmp_path, monkeypatch, setting):
    """`eval_memory_prior` reaches the held-out evaluation (None: as the run trained)."""
    from grc_jax import train, train_config

    world_dir = tmp_path / "world"
    demo_world.write_demo_world(str(world_dir), seed=0, num_entities=40, num_heldout=8)
    seen = []
    monkeypatch.setattr(
        world,
        "evaluate_world",
        lambda *args, memory_prior=None: seen.append(memory_prior) or {"memory_qa/exact_match": 0.0},
    )
    c = train_config.defaults()
    values = {
        "model.hidden_size": 32,
        "model.intermediate_size": 64,
        "model.num_layers": 1,
        "model.num_heads": 4,
        "model.num_kv_heads": 2,
        "model.head_dim": 8,
        "model.num_latents": 4,
        "model.max_segment_len": 96,
        "data.row_len": 384,
        "data.max_segments_per_row": 8,
        "data.max_negatives": 2,
        "data.reader_distractors": 2,
        "train.steps": 1,
        "train.global_batch": 8,
        "train.warmup_steps": 0,
        "checkpoint.every": 1,
        "data.train_files": str(world_dir / "train.jsonl"),
        "data.tokenizer": str(world_dir),
        "data.eval_dir": str(world_dir),
    }
    for key, value in values.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    c.checkpoint.use_async = False
    if setting is not None:
        c.eval_memory_prior = setting
    train.train_and_evaluate(c, tmp_path / "run")
    assert seen == [setting]


def test_reasoned_priors_come_from_the_prompts_self_reasoned_embedding(config, params, tokenizer):
    engine = Engine(
        config,
        params,
        tokenizer,
        num_pages=128,
        page_size=4,
        prefill_chunk=16,
        batch_size=8,
        eor_token="<|end_of_reasoning|>",
        max_reason_tokens=4,
    )
    ids = [i for row in engine.compress(DOCS[:3]) for i in row]
    prompt = tokenizer.encode(QUESTION)
    tau = 0.05
    bias = engine.memory_priors([prompt], [ids], "reason", tau)[0]
    question_emb, trace = engine.embed_with_reasoning_tokens([prompt])
    mem_emb = engine.embed_tokens([tokenizer.encode(d)[:P] for d in DOCS[:3]])
    np.testing.assert_allclose(
        bias, np.asarray(priors.memory_prior(question_emb[0], mem_emb, tau)), rtol=1e-5, atol=1e-5
    )
    # The trace changes the embedding, so the prior differs from the plain prompt's.
    assert trace[0] and np.abs(np.asarray(bias) - engine.memory_priors([prompt], [ids], True, tau)[0]).max() > 1e-4
    # Generation under "reason" is generation under those scores given by the caller.
    scores = [[float(np.dot(question_emb[0], engine.bank.get(m).embedding)) for m in ids]]
    assert engine.generate(QUESTION, memories=ids, max_new_tokens=4, memory_prior="reason") == engine.generate(
        QUESTION, memories=ids, max_new_tokens=4, memory_prior=scores
    )
