"""The GRC attention rule and positions, against a literal reading of docs/design.md sections 2-3."""

import numpy as np
import pytest

from grc_jax import layout
from grc_jax.layout import LATENT, READER, TEXT

P, K = 16, 4


def brute_force_mask(example, segment, kind):
    n = len(example)
    mask = np.zeros((n, n), bool)
    for i in range(n):
        if example[i] == 0:
            mask[i, i] = True  # padding sees itself only, to keep its softmax finite
            continue
        for j in range(i + 1):
            if example[j] != example[i]:
                continue
            if kind[i] in (TEXT, LATENT):
                mask[i, j] = segment[j] == segment[i] and kind[j] in (TEXT, LATENT)
            else:
                mask[i, j] = kind[j] == READER or kind[j] == LATENT
    return mask


def brute_force_positions(example, segment, kind):
    n = len(example)
    pos = np.zeros(n, int)
    for i in range(n):
        if example[i] == 0:
            continue
        same_seg = [j for j in range(n) if example[j] == example[i] and segment[j] == segment[i]]
        if kind[i] == TEXT:
            text = [j for j in same_seg if kind[j] == TEXT]
            pos[i] = P - len(text) + text.index(i)
        elif kind[i] == LATENT:
            pos[i] = P + [j for j in same_seg if kind[j] == LATENT].index(i)
        else:
            readers = [j for j in range(n) if example[j] == example[i] and kind[j] == READER]
            pos[i] = P + K + readers.index(i)
    return pos


def random_rows(seed, rows=4, length=40):
    rng = np.random.default_rng(seed)
    example = rng.integers(0, 4, (rows, length))
    segment = rng.integers(0, 4, (rows, length))
    kind = rng.integers(0, 3, (rows, length))
    return example.astype(np.int32), segment.astype(np.int32), kind.astype(np.int32)


@pytest.mark.parametrize("seed", range(5))
def test_mask_equals_brute_force_on_random_metadata(seed):
    example, segment, kind = random_rows(seed)
    mask = np.asarray(layout.attention_mask(layout.TokenMeta(example, segment, kind)))
    for b in range(len(example)):
        np.testing.assert_array_equal(mask[b], brute_force_mask(example[b], segment[b], kind[b]))


def built_rows(seed):
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(4):
        segments = [rng.integers(5, 50, rng.integers(1, P + 1)).tolist() for _ in range(rng.integers(0, 3))]
        reader = rng.integers(5, 50, rng.integers(0 if segments else 1, 6)).tolist()
        examples.append(layout.example_pieces(segments, reader, list(range(100, 100 + K)), P))
    return layout.pack_rows(examples, 64)


@pytest.mark.parametrize("seed", range(5))
def test_mask_and_positions_on_built_rows(seed):
    for row in built_rows(seed):
        meta = layout.TokenMeta(row.example[None], row.segment[None], row.kind[None])
        np.testing.assert_array_equal(
            np.asarray(layout.attention_mask(meta))[0], brute_force_mask(row.example, row.segment, row.kind)
        )
        np.testing.assert_array_equal(
            np.asarray(layout.positions(meta, P, K))[0], brute_force_positions(row.example, row.segment, row.kind)
        )


def test_design_doc_picture():
    """The table of docs/design.md section 2: two documents, a question and an answer."""
    latents = [90, 91]
    pieces = layout.example_pieces([[1, 2, 3], [4, 5]], [6, 7, 8], latents, P)
    row = layout.pack_rows([pieces], 12)[0]
    mask = np.asarray(layout.attention_mask(layout.TokenMeta(row.example[None], row.segment[None], row.kind[None])))[0]
    doc1, l1, doc2, l2, reader = range(0, 3), range(3, 5), range(5, 7), range(7, 9), range(9, 12)
    assert mask[np.ix_(l1, doc1)].all() and not mask[np.ix_(doc2, doc1)].any() and not mask[np.ix_(l2, l1)].any()
    assert mask[np.ix_(reader, l1)].all() and mask[np.ix_(reader, l2)].all()
    assert not mask[np.ix_(reader, doc1)].any() and not mask[np.ix_(reader, doc2)].any()
    assert mask[11, 9] and not mask[9, 11]
    pos = np.asarray(layout.positions(layout.TokenMeta(row.example[None], row.segment[None], row.kind[None]), P, 2))[0]
    np.testing.assert_array_equal(pos, [13, 14, 15, 16, 17, 14, 15, 16, 17, 18, 19, 20])
    np.testing.assert_array_equal(row.latent_index, [[3, 4], [7, 8]])


def test_packed_examples_get_their_own_ids_and_padding():
    a = layout.example_pieces([[1, 2]], [3], [9], P)
    b = layout.example_pieces([], [4, 5], [9], P)
    rows = layout.pack_rows([a, b, a], 8, pad_id=7)
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[0].example, [1, 1, 1, 1, 2, 2, 0, 0])
    np.testing.assert_array_equal(rows[0].tokens, [1, 2, 9, 3, 4, 5, 7, 7])
    np.testing.assert_array_equal(rows[1].example, [1, 1, 1, 1, 0, 0, 0, 0])


def test_causal_meta_is_all_reader():
    meta = layout.causal_meta(np.array([[True, True, False]]))
    mask = np.asarray(layout.attention_mask(meta))[0]
    np.testing.assert_array_equal(mask, [[1, 0, 0], [1, 1, 0], [0, 0, 1]])


def test_split_segments():
    assert layout.split_segments(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="empty text"):
        layout.split_segments([], 4)


def test_builder_errors():
    with pytest.raises(ValueError, match=r"segment 2 has 17 tokens; it must have 1\.\.16"):
        layout.example_pieces([[1], [0] * 17], [], [9], P)
    with pytest.raises(ValueError, match=r"segment 1 has 0 tokens"):
        layout.example_pieces([[]], [1], [9], P)
    with pytest.raises(ValueError, match=r"example 1 has 9 tokens, more than the row length 8"):
        layout.pack_rows([layout.example_pieces([], [1], [9], P), layout.example_pieces([], [1] * 9, [9], P)], 8)


@pytest.mark.parametrize("length", range(1, 18))
def test_causal_mask_equals_the_rule_for_an_all_reader_batch_under_jit(length):
    """Also guards a jaxlib 0.10.2 CPU compiler abort seen at length 8 with the general rule."""
    import jax

    valid = np.ones((2, length), bool)
    valid[1, length // 2 :] = False
    direct = np.asarray(jax.jit(layout.causal_mask)(valid))
    rule = np.asarray(layout.attention_mask(layout.causal_meta(valid)))
    np.testing.assert_array_equal(direct, rule)
