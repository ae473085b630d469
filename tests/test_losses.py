"""The three objectives against literal numpy readings of docs/design.md section 4."""

import jax
import jax.numpy as jnp
import numpy as np

from grc_jax import losses


def brute_force_infonce(emb, seg_kind, seg_positive, seg_doc_id, tau):
    b, s, _ = emb.shape
    flat, kind, doc = emb.reshape(b * s, -1), seg_kind.reshape(-1), seg_doc_id.reshape(-1)
    total, count = 0.0, 0
    for row in range(b):
        for slot in range(s):
            if seg_kind[row, slot] != losses.QUERY or seg_positive[row, slot] < 0:
                continue
            q = flat[row * s + slot]
            pos = row * s + seg_positive[row, slot]
            cands = [j for j in range(b * s) if kind[j] == losses.DOCUMENT and (j == pos or doc[j] != doc[pos])]
            scores = np.array([q @ flat[j] / tau for j in cands])
            total += np.log(np.exp(scores - scores.max()).sum()) + scores.max() - q @ flat[pos] / tau
            count += 1
    return total / count


def test_contrastive_loss_matches_brute_force_with_duplicates_masked():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 4, 8))
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    seg_kind = np.array([[1, 2, 2, 0], [1, 2, 2, 2], [2, 2, 1, 0]])
    seg_positive = np.array([[1, -1, -1, -1], [3, -1, -1, -1], [-1, -1, 0, -1]])
    seg_doc_id = np.array([[-1, 10, 11, -1], [-1, 10, 12, 13], [14, 11, -1, -1]])  # doc 10 appears twice
    loss, metrics = losses.contrastive_loss(
        jnp.asarray(emb), jnp.asarray(seg_kind), jnp.asarray(seg_positive), jnp.asarray(seg_doc_id), 0.1
    )
    np.testing.assert_allclose(
        float(loss), brute_force_infonce(emb, seg_kind, seg_positive, seg_doc_id, 0.1), rtol=1e-5
    )
    assert int(metrics["rep_queries"]) == 3


def test_contrastive_loss_has_finite_gradients_and_pulls_the_positive_closer():
    rng = np.random.default_rng(1)
    emb = jnp.asarray(rng.normal(size=(2, 3, 8)))
    kind = jnp.array([[1, 2, 2], [1, 2, 2]])
    positive = jnp.array([[1, -1, -1], [2, -1, -1]])
    doc = jnp.array([[-1, 1, 2], [-1, 3, 4]])

    def loss(e):
        e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
        return losses.contrastive_loss(e, kind, positive, doc, 0.05)[0]

    grads = jax.grad(loss)(emb)
    assert np.isfinite(np.asarray(grads)).all()
    assert float(loss(emb - 0.5 * grads)) < float(loss(emb))


def test_token_cross_entropy_weights_select_positions():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    targets = jnp.array([[0, 0, 1]])
    loss, count = losses.token_cross_entropy(logits, targets, jnp.array([[0.0, 1.0, 1.0]]))
    np.testing.assert_allclose(float(loss), -(np.log(0.9) + np.log(0.8)) / 2, rtol=1e-6)
    assert float(count) == 2
    empty, _ = losses.token_cross_entropy(logits, targets, jnp.zeros((1, 3)))
    assert float(empty) == 0.0
