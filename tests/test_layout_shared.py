"""One layout for every row (docs/design.md sections 2, 3 and 5): a segment the training builder
lays out inside a packed row and the same segment `Engine` lays out alone are the same arrays,
and so the memory `Engine` computes alone is the one training computed at that segment's latents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax import layout, model
from grc_jax.config import ModelConfig
from grc_jax.data import builder, demo_world
from grc_jax.inference import Engine
from grc_jax.tokenizer import Tokenizer

P, K = 16, 4
DOCS = [
    "Zorvak lives in Quarn and keeps an owl.",
    "Belna is a glassblower from Ostreth.",
    "The river Quarn floods every spring, and the potters of the valley move uphill for months.",
]
QUESTION, ANSWER, QUERY = "Who keeps an owl?", "Zorvak", "owl keeper"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(demo_world.train_tokenizer((DOCS + [QUESTION, ANSWER, QUERY]) * 3, vocab_size=360))


@pytest.fixture(scope="module")
def engine(tokenizer):
    config = ModelConfig(
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
    params = jax.tree.map(
        lambda x: x * 4 if x.ndim >= 2 else x, jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(0))
    )
    return Engine(config, params, tokenizer, num_pages=64, page_size=4, prefill_chunk=16, batch_size=4)


def _training_batch(engine: Engine, question_segments: bool = False) -> dict[str, np.ndarray]:
    """Two records packed into one row by the training builder: a query with a positive, a look-alike
    seen by the reader and a negative it does not see; and a plain text record."""
    enc = engine.tokenizer.encode
    config = builder.BuildConfig(
        max_segment_len=P,
        num_latents=K,
        latent_ids=engine.latent_ids,
        row_len=160,
        max_segments_per_row=8,
        bos_id=1,
        eos_id=2,
        eor_id=3,
        reader_distractors=1,
        question_segments=question_segments,
    )
    qa = builder.TokenizedRecord(
        source="qa",
        query=enc(QUERY),
        positive=enc(DOCS[0]),
        negatives=(enc(DOCS[1]), enc(DOCS[2])),
        question=enc(QUESTION),
        answer=enc(" " + ANSWER),
        positive_doc_id=0,
        negative_doc_ids=(1, 2),
    )
    text = builder.TokenizedRecord(source="text", text=enc(DOCS[1]))
    units = [builder.build_unit(r, config, builder.unit_rng(0, 0, i)) for i, r in enumerate([text, qa])]
    batch = builder.pack_units(units, config)
    assert len(batch["tokens"]) == 1  # one row
    return batch


def _segments_of(batch: dict[str, np.ndarray]) -> list[list[int]]:
    """The text of every used segment slot of row 0, in slot order."""
    used = batch["seg_kind"][0] != builder.SEG_UNUSED
    text = batch["kind"][0] == layout.TEXT
    return [batch["tokens"][0][text & (batch["segment"][0] == s + 1)].tolist() for s in np.flatnonzero(used)]


@pytest.mark.parametrize("question_segments", [False, True])
def test_a_training_segment_and_engines_segment_are_the_same_arrays(engine, question_segments):
    batch = _training_batch(engine, question_segments)
    segments = _segments_of(batch)
    assert len(segments) == 4 + question_segments  # query, positive, look-alike, negative (+ question)
    meta = layout.TokenMeta(*(jnp.asarray(batch[k]) for k in ("example", "segment", "kind")))
    row_positions = np.asarray(layout.positions(meta, P, K))[0]
    row_mask = np.asarray(layout.attention_mask(meta))[0]
    alone = layout.segment_rows(segments, engine.latent_ids, P, P + K, num_rows=len(segments) + 1)
    alone_meta = layout.TokenMeta(*(jnp.asarray(a) for a in (alone.example, alone.segment, alone.kind)))
    alone_positions = np.asarray(layout.positions(alone_meta, P, K))
    alone_mask = np.asarray(layout.attention_mask(alone_meta))
    for slot, text in enumerate(segments):
        where = np.flatnonzero(batch["segment"][0] == slot + 1)  # the segment's text and latents in the row
        n = len(text) + K
        assert len(where) == n and (np.diff(where) == 1).all()
        mine = slice(0, n)
        np.testing.assert_array_equal(batch["tokens"][0][where], alone.tokens[slot][mine])
        np.testing.assert_array_equal(batch["kind"][0][where], alone.kind[slot][mine])
        np.testing.assert_array_equal(batch["seg_latent_index"][0][slot] - where[0], alone.latent_index[slot])
        # Same positions and the same attention inside the segment, hence the same hidden states.
        np.testing.assert_array_equal(row_positions[where], alone_positions[slot][mine])
        np.testing.assert_array_equal(row_mask[np.ix_(where, where)], alone_mask[slot][mine, mine])
        # In the packed row the segment sees nothing outside itself, as alone it has nothing else to see.
        assert not row_mask[where][:, np.setdiff1d(np.arange(row_mask.shape[1]), where)].any()
        assert (alone.example[slot][n:] == 0).all() and (alone.tokens[slot][n:] == 0).all()
    assert (alone.example[-1] == 0).all() and (alone.latent_index[-1] == 0).all()  # a padding row


def test_engines_memory_is_the_memory_at_the_segments_latents_in_a_training_row(engine):
    batch = _training_batch(engine)
    segments = _segments_of(batch)
    used = len(segments)
    index = batch["seg_latent_index"][:, :used]
    out = model.forward(
        engine.config,
        engine.params,
        jnp.asarray(batch["tokens"]),
        layout.TokenMeta(*(jnp.asarray(batch[k]) for k in ("example", "segment", "kind"))),
        kv_index=jnp.asarray(index.reshape(1, -1)),
        compute_logits=False,
    )
    row_keys, row_values = np.asarray(out.keys[:, 0]), np.asarray(out.values[:, 0])  # [layers, used * K, ...]
    row_embeddings = np.asarray(model.pool_latents(engine.config, engine.params, out.hidden, jnp.asarray(index))[0])
    keys, values, embeddings = engine._segment_pass(segments)  # what compress stores and embed returns
    assert keys.shape[:3] == (used, engine.config.num_layers, K)
    for s in range(used):
        # Equal up to float rounding: the row is longer, so sums run in another order.
        np.testing.assert_allclose(keys[s], row_keys[:, s * K : (s + 1) * K], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(values[s], row_values[:, s * K : (s + 1) * K], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(embeddings[s], row_embeddings[s], rtol=1e-5, atol=1e-5)


def test_a_question_segment_longer_than_p_is_cut_as_engine_cuts_it(engine):
    enc = engine.tokenizer.encode
    long_question = enc(" ".join(DOCS))
    assert len(long_question) > P
    config = builder.BuildConfig(
        max_segment_len=P,
        num_latents=K,
        latent_ids=engine.latent_ids,
        row_len=200,
        max_segments_per_row=8,
        bos_id=1,
        eos_id=2,
        eor_id=3,
        question_segments=True,
    )
    record = builder.TokenizedRecord(
        source="qa", positive=enc(DOCS[0]), question=long_question, answer=enc(" " + ANSWER), positive_doc_id=0
    )
    unit = builder.build_unit(record, config, builder.unit_rng(0, 0, 0))
    question_slot = int(np.flatnonzero(unit.seg_kind == builder.SEG_QUESTION)[0])
    text = unit.tokens[(unit.segment == question_slot + 1) & (unit.kind == layout.TEXT)]
    np.testing.assert_array_equal(text, long_question[:P])


def test_row_builder_join_and_example_row_agree_with_packing():
    a = layout.example_pieces([[1, 2], [3]], [4, 5], [9, 8], 4)
    b = layout.example_pieces([[6]], [], [9, 8], 4)
    packed = layout.pack_rows([a, b], 16, pad_id=7)[0]
    first = layout.example_row([[1, 2], [3]], [4, 5], [9, 8], 4)
    second = layout.example_row([[6]], [], [9, 8], 4)
    joined = layout.join([first, second])
    n = len(joined.tokens)
    for got, want in zip(joined, packed):
        np.testing.assert_array_equal(got, want[:n] if got.ndim == 1 else want)
    np.testing.assert_array_equal(joined.segment, [1, 1, 1, 1, 2, 2, 2, 0, 0, 3, 3, 3])
    np.testing.assert_array_equal(joined.latent_index, [[2, 3], [5, 6], [10, 11]])
    assert (packed.example[n:] == 0).all() and (packed.tokens[n:] == 7).all()
    assert (packed.kind[n:] == layout.READER).all()
    np.testing.assert_array_equal(
        layout.example_row([[1, 2], [3]], [4, 5], [9, 8], 4, length=16, pad_id=7).tokens,
        layout.pack_rows([a], 16, pad_id=7)[0].tokens,
    )


def test_row_builder_errors():
    builder = layout.RowBuilder([9], max_segment_len=2)
    with pytest.raises(ValueError, match="new_example"):
        builder.add_reader([1])
    builder.new_example()
    with pytest.raises(ValueError, match=r"segment 1 has 3 tokens; it must have 1\.\.2"):
        builder.add_segment([1, 2, 3])
    builder.add_segment([1, 2])
    with pytest.raises(ValueError, match="more than the row length 2"):
        builder.finish(2)
    with pytest.raises(ValueError, match="3 segments do not fit 2 rows"):
        layout.segment_rows([[1], [2], [3]], [9], 2, 3, num_rows=2)
