"""Perplexity of the plain LM on text: equal to transformers' own loss on the same windows."""

import math

import numpy as np
import pytest
from tiny_hf import VOCAB, make_hf_model

from grc_jax import hf
from grc_jax.eval.perplexity import perplexity, text_windows

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


class _CharTokenizer:
    """One id per character (mod the tiny vocabulary), enough to test the windowing."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % VOCAB for c in text]


def test_windows_cover_the_joined_text_without_overlap():
    windows = text_windows(_CharTokenizer(), ["abcde", "fg"], window=3)
    joined = _CharTokenizer().encode("abcde\n\nfg")
    assert [t for w in windows for t in w] == joined  # the last window has 3 tokens: none dropped
    assert [len(w) for w in windows] == [3, 3, 3]
    assert text_windows(_CharTokenizer(), ["abcd"], window=3) == [[ord(c) % VOCAB for c in "abc"]]  # 1-token tail
    assert len(text_windows(_CharTokenizer(), ["abcdef" * 10], window=4, max_tokens=10)) == 3
    with pytest.raises(ValueError, match="window"):
        text_windows(_CharTokenizer(), ["abc"], window=1)


def test_perplexity_equals_transformers_loss(tmp_path):
    hf_model = make_hf_model("llama", tmp_path)
    config, params = hf.load_pretrained(tmp_path, num_latents=4)
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, VOCAB, n).tolist() for n in (16, 16, 9, 16, 5)]  # padded batches of 2
    ours = perplexity(config, params, windows, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:  # one unpadded window at a time: transformers' mean loss over its n-1 targets
            ids = torch.tensor([w])
            loss = float(hf_model(ids, labels=ids).loss)
            total, count = total + loss * (len(w) - 1), count + len(w) - 1
    assert ours["tokens_scored"] == count == sum(len(w) - 1 for w in windows)
    assert ours["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert ours["perplexity"] > 2.0  # a random model: far from a trivial 1.0
