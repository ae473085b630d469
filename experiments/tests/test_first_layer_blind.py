"""The experiment wrappers in experiments/ that experiments/HISTORY.md figures depend on."""

import sys
from pathlib import Path

import jax
import numpy as np

from grc_jax import layout, model
from grc_jax.config import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import first_layer_blind  # noqa: E402

P, K = 16, 4
CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    num_latents=K,
    max_segment_len=P,
)
PARAMS = jax.tree.map(lambda a: a * 5, model.init_params(CONFIG, jax.random.key(0)))


def _logits(forward, segments, reader):
    row = layout.pack_rows([layout.example_pieces(segments, reader, list(CONFIG.latent_token_ids), P)], 48)[0]
    meta = layout.TokenMeta(row.example[None], row.segment[None], row.kind[None])
    return np.asarray(forward(CONFIG, PARAMS, row.tokens[None], meta).logits[0]), row


def test_first_layer_blind_changes_only_what_readers_take_from_memories_in_layer_0():
    segments, reader = [[5, 6, 7], [8, 9, 10, 11]], [20, 21, 22]
    usual, row = _logits(model.forward, segments, reader)
    blind, _ = _logits(first_layer_blind.forward, segments, reader)
    text_and_latents = row.kind != layout.READER
    np.testing.assert_allclose(blind[text_and_latents], usual[text_and_latents], rtol=1e-5, atol=1e-5)
    assert np.abs(blind[row.kind == layout.READER] - usual[row.kind == layout.READER]).max() > 1e-2
    # Without memories there is nothing to be blind to.
    alone, _ = _logits(model.forward, [], reader)
    alone_blind, _ = _logits(first_layer_blind.forward, [], reader)
    np.testing.assert_allclose(alone_blind, alone, rtol=1e-5, atol=1e-5)
