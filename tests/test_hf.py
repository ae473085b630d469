"""HF interop: logit parity with transformers, round trip, shift invariance, error paths."""

import json
import os
import stat
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_hf import ARCH_CONFIGS, VOCAB, hf_last_hidden, hf_logits, make_hf_model

from grc_jax import hf, layout, model
from grc_jax.config import ModelConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

K = 4


def padded_batch(rng: np.random.Generator, lengths=(7, 12, 3)):
    tokens = rng.integers(0, VOCAB, (len(lengths), max(lengths)))
    valid = np.arange(max(lengths))[None] < np.asarray(lengths)[:, None]
    return np.where(valid, tokens, 0).astype(np.int32), valid


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(ARCH_CONFIGS))
def test_logit_parity_with_transformers(kind, tmp_path):
    hf_model = make_hf_model(kind, tmp_path)
    config, params = hf.load_pretrained(tmp_path, num_latents=K)
    assert config.vocab_size == VOCAB and config.total_vocab_size == VOCAB + K
    tokens, valid = padded_batch(np.random.default_rng(0))
    ours = np.asarray(model.forward(config, params, tokens, valid=valid).logits)
    ref = hf_logits(hf_model, tokens, valid)
    diff = np.abs(ours[..., :VOCAB] - ref)[valid]
    assert diff.max() <= 1e-4, diff.max()
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits


def test_left_padding_matches_transformers_positions(tmp_path):
    hf_model = make_hf_model("qwen3", tmp_path)
    config, params = hf.load_pretrained(tmp_path, num_latents=K)
    tokens, valid = padded_batch(np.random.default_rng(1))
    tokens, valid = tokens[:, ::-1].copy(), valid[:, ::-1].copy()  # left padding
    positions = np.maximum(np.cumsum(valid, -1) - 1, 0)
    ours = np.asarray(model.forward(config, params, tokens, valid=valid).logits)
    ref = hf_logits(hf_model, tokens, valid, positions)
    assert np.abs(ours[..., :VOCAB] - ref)[valid].max() <= 1e-4


def test_latent_rows_start_at_mean_embedding(tmp_path):
    make_hf_model("llama", tmp_path)
    config, params = hf.load_pretrained(tmp_path, num_latents=K)
    embed = np.asarray(params["embed"])
    np.testing.assert_allclose(embed[VOCAB:], np.broadcast_to(embed[:VOCAB].mean(0), (K, embed.shape[1])), atol=1e-6)


@pytest.mark.parametrize("kind", ["llama3_rope", "qwen2_tied", "qwen3"])
def test_round_trip_through_transformers(kind, tmp_path):
    make_hf_model(kind, tmp_path / "src")
    config, params = hf.load_pretrained(tmp_path / "src", num_latents=K)
    params = jax.tree.map(lambda a: a * 1.01, params)  # differ from the source, so the export is what's read
    out = hf.save_pretrained(config, params, tmp_path / "export")
    assert json.loads((out / "grc_config.json").read_text())["num_latents"] == K
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tokens, valid = padded_batch(np.random.default_rng(2))
    tokens[0, 2] = VOCAB + 1  # a meta latent token is an ordinary vocabulary row to transformers
    ours = np.asarray(model.forward(config, params, tokens, valid=valid).logits)
    ref = hf_logits(reloaded, tokens, valid)
    assert ref.shape[-1] == VOCAB + K
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    config2, params2 = hf.load_pretrained(out)
    assert config2 == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


@pytest.mark.slow
def test_segment_embedding_is_shift_invariant_against_transformers(tmp_path):
    """A segment embedded inside a packed GRC row (positions P-L .. P+K-1, other segments and a
    reader around it) equals the same segment run alone in transformers at positions 0..L+K-1."""
    make_hf_model("qwen2", tmp_path / "src")
    config, params = hf.load_pretrained(tmp_path / "src", num_latents=K, max_segment_len=16)
    hf.save_pretrained(config, params, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True).eval()
    rng = np.random.default_rng(3)
    segment = rng.integers(0, VOCAB, 9).tolist()
    latents = list(config.latent_token_ids)
    other = rng.integers(0, VOCAB, 5).tolist()
    pieces = layout.example_pieces([other, segment], rng.integers(0, VOCAB, 6).tolist(), latents, 16)
    row = layout.pack_rows([pieces], 48)[0]
    meta = layout.TokenMeta(row.example[None], row.segment[None], row.kind[None])
    out = model.forward(config, params, row.tokens[None], meta)
    ours = model.pool_latents(config, params, out.hidden, jnp.asarray(row.latent_index[None]))[0, 1]
    alone = hf_last_hidden(reloaded, np.asarray(segment + latents))[-K:].mean(0)
    ref = alone / np.linalg.norm(alone)
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


@pytest.mark.slow
def test_sharded_save_and_load(tmp_path):
    config = ModelConfig(vocab_size=VOCAB, num_latents=K)
    params = model.init_params(config, jax.random.key(0))
    out = hf.save_pretrained(config, params, tmp_path / "sharded", max_shard_size=20_000)
    index = json.loads((out / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (out / hf.WEIGHTS_FILE).exists()
    _, params2 = hf.load_pretrained(out)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert reloaded.config.vocab_size == VOCAB + K


@pytest.mark.slow
def test_bfloat16_params_round_trip(tmp_path):
    config = ModelConfig(vocab_size=VOCAB, num_latents=K, param_dtype="bfloat16", dtype="bfloat16")
    params = model.init_params(config, jax.random.key(1))
    hf.save_pretrained(config, params, tmp_path / "bf16")
    config2, params2 = hf.load_pretrained(tmp_path / "bf16")  # the checkpoint's dtype, as transformers loads it
    assert (config2.param_dtype, config2.dtype) == ("bfloat16", "bfloat16")
    assert params2["embed"].dtype == jnp.bfloat16
    assert hf.load_pretrained(tmp_path / "bf16", param_dtype="float32")[1]["embed"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(params["embed"], np.float32), np.asarray(params2["embed"], np.float32))


def test_save_replaces_previous_export_whole(tmp_path, monkeypatch):
    config = ModelConfig(vocab_size=VOCAB, num_latents=K)
    params = model.init_params(config, jax.random.key(0))
    out = hf.save_pretrained(config, params, tmp_path / "exp")
    before = (out / hf.WEIGHTS_FILE).read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(hf, "_write_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        hf.save_pretrained(config, jax.tree.map(lambda a: a + 1, params), out)
    assert (out / hf.WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temp dirs left behind
    hf.load_pretrained(out)


def test_the_swap_never_leaves_the_export_path_without_an_export(tmp_path, monkeypatch):
    config = ModelConfig(vocab_size=VOCAB, num_latents=K)
    params = model.init_params(config, jax.random.key(0))
    out = hf.save_pretrained(config, params, tmp_path / "exp")
    real_replace = os.replace

    def killed_if_the_export_is_moved_aside(src, dst):
        if Path(src) == out:
            raise KeyboardInterrupt("killed while the export path is empty")
        real_replace(src, dst)

    monkeypatch.setattr(hf.os, "replace", killed_if_the_export_is_moved_aside)
    hf.save_pretrained(config, jax.tree.map(lambda a: a + 1, params), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # the previous export removed
    np.testing.assert_array_equal(hf.load_pretrained(out)[1]["embed"], params["embed"] + 1)


def test_the_swap_without_an_atomic_exchange_still_replaces_the_export(tmp_path, monkeypatch):
    monkeypatch.setattr(hf, "_exchange", lambda a, b: False)  # no renameat2 (not Linux, old glibc)
    config = ModelConfig(vocab_size=VOCAB, num_latents=K)
    params = model.init_params(config, jax.random.key(0))
    out = hf.save_pretrained(config, params, tmp_path / "exp")
    hf.save_pretrained(config, jax.tree.map(lambda a: a + 1, params), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    np.testing.assert_array_equal(hf.load_pretrained(out)[1]["embed"], params["embed"] + 1)


# --- error paths -------------------------------------------------------------------------


def _saved_llama(tmp_path):
    make_hf_model("llama", tmp_path)
    return tmp_path


def test_unsupported_architecture(tmp_path):
    d = _saved_llama(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: unsupported architectures \['MistralForCausalLM'\]"):
        hf.load_pretrained(d)


def test_attention_bias_outside_qwen2_is_refused(tmp_path):
    d = _saved_llama(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["attention_bias"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: attention_bias=true is not supported for LlamaForCausalLM"):
        hf.load_pretrained(d)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json: file not found"):
        hf.load_pretrained(tmp_path)


def test_invalid_config_json_names_file_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "vocab_size": 3,\n  oops\n}')
    with pytest.raises(ValueError, match=r"config\.json:3: invalid JSON"):
        hf.load_pretrained(tmp_path)


def test_pickle_only_weights_say_how_to_convert(tmp_path):
    d = _saved_llama(tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ValueError, match=r"only PyTorch pickle weights \(pytorch_model\.bin\).*save_pretrained"):
        hf.load_pretrained(d)


def test_missing_weights(tmp_path):
    d = _saved_llama(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        hf.load_pretrained(d)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _saved_llama(tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(KeyError, match=r"tensor 'layers\.1\.mlp\.up_proj\.weight' not found"):
        hf.load_pretrained(d)


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _saved_llama(tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 32), np.float32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' "
        r"has shape \(3, 32\), expected \(16, 32\)",
    ):
        hf.load_pretrained(d)


def test_unexpected_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _saved_llama(tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"does not use: \['model\.layers\.0\.mlp\.extra\.weight'\]"):
        hf.load_pretrained(d)


def test_missing_shard_file_is_named(tmp_path):
    config = ModelConfig(vocab_size=VOCAB, num_latents=K)
    out = hf.save_pretrained(
        config, model.init_params(config, jax.random.key(0)), tmp_path / "s", max_shard_size=20_000
    )
    shard = sorted(set(json.loads((out / hf.INDEX_FILE).read_text())["weight_map"].values()))[1]
    (out / shard).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shard}: weights file named in"):
        hf.load_pretrained(out)


def test_num_latents_mismatch_with_export(tmp_path):
    config = ModelConfig(vocab_size=VOCAB, num_latents=K)
    out = hf.save_pretrained(config, model.init_params(config, jax.random.key(0)), tmp_path / "e")
    with pytest.raises(ValueError, match=r"grc_config\.json: the model was trained with num_latents=4, not 8"):
        hf.load_pretrained(out, num_latents=8)


def test_reloading_an_export_with_its_own_or_other_grc_settings(tmp_path):
    config = ModelConfig(vocab_size=VOCAB, num_latents=K, embed_dim=8, pooling="last")
    out = hf.save_pretrained(config, model.init_params(config, jax.random.key(0)), tmp_path / "e")
    same, _ = hf.load_pretrained(out, K, pooling="last", embed_dim=8, scan_layers=False)  # as train.py passes them
    assert (same.pooling, same.embed_dim, same.scan_layers) == ("last", 8, False)
    with pytest.raises(ValueError, match=r"grc_config\.json: the model was trained with embed_dim=8, not None"):
        hf.load_pretrained(out, pooling="last", embed_dim=None)
    with pytest.raises(ValueError, match=r"grc_config\.json: the model was trained with pooling='last', not 'mean'"):
        hf.load_pretrained(out, pooling="mean")


def test_export_keeps_the_directory_s_other_files_and_refuses_a_foreign_one(tmp_path):
    config = ModelConfig(vocab_size=VOCAB, num_latents=K)
    params = model.init_params(config, jax.random.key(0))
    old_umask = os.umask(0o022)
    try:
        out = hf.save_pretrained(config, params, tmp_path / "e", max_shard_size=20_000)  # sharded
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        (out / "README.md").write_text("model card")
        (out / "eval").mkdir()
        (out / "eval" / "report.json").write_text("{}")
        hf.save_pretrained(config, params, out)  # one file now: the old shards and index must go
    finally:
        os.umask(old_umask)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["README.md", "eval", "config.json", "grc_config.json", hf.WEIGHTS_FILE])
    assert (out / "eval" / "report.json").read_text() == "{}"
    run = tmp_path / "run"
    (run / "checkpoints" / "100").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"run: not empty and not a grc_jax export \(no grc_config\.json\)"):
        hf.save_pretrained(config, params, run)
    assert (run / "checkpoints" / "100").is_dir()


def test_a_tied_checkpoint_may_store_a_copy_of_the_embedding_as_head(tmp_path):
    from safetensors.numpy import load_file, save_file

    config = ModelConfig(vocab_size=VOCAB, num_latents=K, tie_word_embeddings=True)
    out = hf.save_pretrained(config, model.init_params(config, jax.random.key(0)), tmp_path / "e")
    tensors = load_file(out / hf.WEIGHTS_FILE)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, out / hf.WEIGHTS_FILE)
    hf.load_pretrained(out)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1}, out / hf.WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"tie_word_embeddings=true, but lm_head\.weight differs"):
        hf.load_pretrained(out)


def test_unsupported_rope_type(tmp_path):
    d = _saved_llama(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"rope type 'yarn' is not supported"):
        hf.load_pretrained(d)


def test_export_carries_the_tokenizer_with_latent_tokens(tmp_path):
    from test_tokenizer import write_tokenizer

    from grc_jax.tokenizer import Tokenizer

    write_tokenizer(tmp_path / "tok", vocab_size=300)
    config = ModelConfig(vocab_size=320, num_latents=K)
    out = hf.save_pretrained(
        config,
        model.init_params(config, jax.random.key(0)),
        tmp_path / "e",
        tokenizer=Tokenizer.from_dir(tmp_path / "tok"),
    )
    reloaded = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert [reloaded.convert_tokens_to_ids(f"<|mlt_{j}|>") for j in range(K)] == list(config.latent_token_ids)
    assert Tokenizer.from_dir(out).latent_ids(K) == list(config.latent_token_ids)
    # The tokenizer's special tokens (eos </s> = 1, pad <pad> = 0, no bos), not Llama's defaults.
    hf_config = transformers.AutoConfig.from_pretrained(out, local_files_only=True)
    generation = transformers.GenerationConfig.from_pretrained(out, local_files_only=True)
    for c in (hf_config, generation):
        assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (None, 1, 0)


def test_weight_loaders_load_with_numpys_huge_page_advice_off_and_restore_it():
    from grc_jax import gguf

    setter = np._core.multiarray._set_madvise_hugepage  # returns the previous setting
    seen = []

    @hf.ordinary_pages
    def load(fail: bool) -> None:
        state = setter(False)
        setter(state)
        seen.append(state)
        if fail:
            raise ValueError("a bad file")

    before = setter(True)
    try:
        load(False)
        with pytest.raises(ValueError, match="a bad file"):
            load(True)
        assert seen == [False, False]
        assert setter(True) is True  # restored after a load and after a failed one
    finally:
        setter(before)
    assert hf.load_pretrained.__wrapped__ is not None and gguf.load_gguf.__wrapped__ is not None
