"""The tokenizer wrapper: meta latent tokens at fixed ids, transformers can read what we save."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from grc_jax.tokenizer import Tokenizer

TEXTS = ["the potter from quarn keeps an owl", "belna shu mentors zorvak"] * 20


def write_tokenizer(path, vocab_size=300):
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        TEXTS,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    path.mkdir(parents=True, exist_ok=True)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    return tk


def test_latent_tokens_get_the_ids_after_the_model_vocabulary(tmp_path):
    write_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    model_vocab = len(tok) + 13  # models often have more embedding rows than tokenizer entries
    with_latents = tok.with_latents(4, model_vocab)
    assert with_latents.latent_ids(4) == [model_vocab + j for j in range(4)]
    ids = with_latents.encode("owl<|mlt_0|><|mlt_3|>")
    assert ids[-2:] == [model_vocab, model_vocab + 3]
    assert with_latents.decode(ids) == "owl"
    assert with_latents.decode(ids, skip_special_tokens=False) == "owl<|mlt_0|><|mlt_3|>"
    assert with_latents.with_latents(4, model_vocab).latent_ids(4) == with_latents.latent_ids(4)  # idempotent
    assert tok.special_id("eos_token") == 1 and tok.special_id("pad_token") == 0


def test_saved_tokenizer_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tokenizer(tmp_path / "src")
    tok = Tokenizer.from_dir(tmp_path / "src").with_latents(2, 500)
    tok.save(tmp_path / "out")
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    text = "the potter <|mlt_1|> keeps"
    assert reloaded.encode(text, add_special_tokens=False) == tok.encode(text)
    assert reloaded.convert_tokens_to_ids("<|mlt_0|>") == 500
    assert reloaded.eos_token == "</s>"


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json: no tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    write_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match=r"tokenizer id 5 is taken by"):
        tok.with_latents(2, 5)
    with pytest.raises(ValueError, match=r"tokenizer has <\|mlt_0\|> at id 400, the model expects 401"):
        tok.with_latents(1, 400).with_latents(1, 401)
    with pytest.raises(ValueError, match=r"lacks meta latent tokens"):
        tok.latent_ids(2)
    unigram = HFTokenizer(models.Unigram([("a", -1.0), ("b", -2.0)], 0, byte_fallback=False))
    unigram.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"cannot add meta latent tokens at fixed ids to a Unigram tokenizer"):
        Tokenizer.from_dir(tmp_path).with_latents(1, 10)


def test_added_tokens_outside_the_model_vocab_keep_their_ids(tmp_path):
    """Qwen-style tokenizers hold <|im_end|> and the like in added_tokens only, past the BPE vocab;
    adding the meta latent tokens must not renumber them."""
    tk = write_tokenizer(tmp_path, vocab_size=300)
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    before = {t: tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>")}
    assert min(before.values()) >= tk.get_vocab_size(with_added_tokens=False)
    with_latents = tok.with_latents(2, len(tok) + 3)
    assert {t: with_latents.token_to_id(t) for t in before} == before
    assert with_latents.encode("owl<|im_end|>") == tok.encode("owl<|im_end|>")
