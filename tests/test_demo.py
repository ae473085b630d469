"""The README's quick demo runs and shows the shift invariance it claims."""

import pytest

from grc_jax import demo


@pytest.mark.slow
def test_demo_runs_and_embedding_does_not_move(capsys):
    result = demo.main([])
    assert result["drift"] < 1e-5
    printed = capsys.readouterr().out
    assert "embeddings  (3, 64)" in printed and "memories" in printed
