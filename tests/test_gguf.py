"""GGUF import: logits and tokenizer ids equal to transformers' own GGUF loading, on tiny files this
test writes with gguf's writer (float and quantised tensors), and on SmolLM2-135M-Instruct when the
`smollm2` extra is installed; the errors for what is not supported."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from grc_jax import assets, hf, model

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
grc_gguf = importlib.import_module("grc_jax.gguf")  # it needs the gguf package, whose absence skips above
Q = gguf.GGMLQuantizationType

ROOT = Path(__file__).resolve().parents[1]
K = 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_TOKEN = "<think>"  # llama.cpp's USER_DEFINED: whole in text, not special
MISLABELLED = "[PAD 0]"  # marked control, but spelled outside the byte alphabet: not added (as transformers)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The owl keeps the lighthouse by the sea.",
    "Zorvak lives in 1234 Harbour Road, née Ørsted!",
    "def f(x):\n    return x * 2  # twice",
    "Who keeps an owl? Nobody knows…",
] * 4
TEXTS = [
    "Hello <|im_start|>user\nWho keeps an owl?<|im_end|>\n",
    "  two spaces, 12345 digits\n\n\ttab",
    f"{USER_TOKEN}reason{USER_TOKEN} émoji 🤗 née",
    f"{MISLABELLED} <|endoftext|>x",
]

D, FF = 64, 128  # quantised rows need multiples of 32 (the block size)
SHAPES = {  # heads, kv heads, head size; transformers reads no head size for qwen3 GGUFs and takes 128
    "llama": (4, 2, 16),
    "qwen2": (4, 2, 16),
    "qwen3": (2, 1, 128),
}


def _tokenizer_spec() -> tuple[list[str], list[int], list[str]]:
    """tokens, token types and merges of a small byte-level BPE, as a GGUF stores them."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())["model"]
    vocab = sorted(spec["vocab"].items(), key=lambda item: item[1])
    tokens = [t for t, _ in vocab] + [USER_TOKEN, MISLABELLED]
    types = [3 if t in SPECIALS else 1 for t, _ in vocab] + [4, 3]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    return tokens, types, merges


TOKENS, TOKEN_TYPES, MERGES = _tokenizer_spec()
V = len(TOKENS)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order for Llama (written here as its converter does it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _stored(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """(what the file holds, the float32 weights it stands for)."""
    if qtype == Q.F32 or w.ndim == 1:
        return w.astype(np.float32), w.astype(np.float32)
    data = gguf.quants.quantize(w.astype(np.float32), qtype)
    return data, gguf.quants.dequantize(data, qtype).reshape(w.shape).astype(np.float32)


def _finish(w: gguf.GGUFWriter) -> None:
    """Writes what `w` was given (header, metadata, tensors) and closes the file."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_gguf(
    path: Path,
    arch: str,
    qtype: Q,
    *,
    tied: bool = False,
    pre: str = "smollm",
    add_bos: bool = False,
    rope_freqs: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A random 2-layer model of `arch` as llama.cpp writes one; returns the float32 weights the
    file stands for, by HF name, in HF's row order (the reference a correct loader recovers)."""
    H, KV, Dh = SHAPES[arch]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(2048)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1e6)
    if arch == "llama":
        w.add_rope_dimension_count(Dh)
        w.add_vocab_size(V)
    else:
        w.add_key_length(Dh)
        w.add_value_length(Dh)
    w.add_file_type(int(qtype))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)

    ref: dict[str, np.ndarray] = {}

    def tensor(name: str, hf_name: str, shape: tuple[int, ...], *, norm: bool = False, heads: int = 0) -> None:
        x = (1 + 0.1 * rng.standard_normal(shape)) if norm else 0.15 * rng.standard_normal(shape)
        data, ref[hf_name] = _stored(x, Q.F32 if norm else qtype)
        if arch == "llama" and heads:  # quantisation blocks lie along rows, so permuting rows commutes with it
            data = _permute(data, heads)
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)  # uint8: quantised blocks

    tensor("token_embd.weight", "model.embed_tokens.weight", (V, D))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for i in range(2):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        tensor(b + "attn_norm.weight", p + "input_layernorm.weight", (D,), norm=True)
        tensor(b + "attn_q.weight", p + "self_attn.q_proj.weight", (H * Dh, D), heads=H)
        tensor(b + "attn_k.weight", p + "self_attn.k_proj.weight", (KV * Dh, D), heads=KV)
        tensor(b + "attn_v.weight", p + "self_attn.v_proj.weight", (KV * Dh, D))
        tensor(b + "attn_output.weight", p + "self_attn.o_proj.weight", (D, H * Dh))
        if arch == "qwen2":
            for n, rows in (("q", H * Dh), ("k", KV * Dh), ("v", KV * Dh)):
                tensor(b + f"attn_{n}.bias", p + f"self_attn.{n}_proj.bias", (rows,), norm=True)
        if arch == "qwen3":
            tensor(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight", (Dh,), norm=True)
            tensor(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight", (Dh,), norm=True)
        tensor(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (D,), norm=True)
        tensor(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (FF, D))
        tensor(b + "ffn_up.weight", p + "mlp.up_proj.weight", (FF, D))
        tensor(b + "ffn_down.weight", p + "mlp.down_proj.weight", (D, FF))
    tensor("output_norm.weight", "model.norm.weight", (D,), norm=True)
    if not tied:
        tensor("output.weight", "lm_head.weight", (V, D))
    _finish(w)
    return ref


def _transformers_gguf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def _transformers_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(tokens.astype(np.int64))).logits.float().numpy()


def _our_logits(config, params, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(model.forward(config, params, tokens).logits)[..., : config.vocab_size]


CASES = [
    ("llama", Q.F32, False),
    ("llama", Q.F16, True),
    ("llama", Q.BF16, False),
    ("llama", Q.Q8_0, False),
    ("llama", Q.Q4_0, True),
    ("llama", Q.Q4_1, False),
    ("llama", Q.Q5_1, False),
    ("qwen2", Q.Q8_0, True),
    ("qwen2", Q.F16, False),
    ("qwen3", Q.Q4_1, False),
    ("qwen3", Q.F32, True),
]


@pytest.mark.parametrize("arch,qtype,tied", CASES, ids=[f"{a}-{q.name}-{'tied' if t else 'head'}" for a, q, t in CASES])
def test_logits_equal_transformers_gguf_loading(arch, qtype, tied, tmp_path):
    path = tmp_path / f"tiny-{arch}.gguf"
    ref = write_tiny_gguf(path, arch, qtype, tied=tied)
    config, params = hf.load_pretrained(path, num_latents=K)
    H, KV, Dh = SHAPES[arch]
    assert (
        config.architecture,
        config.vocab_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.tie_word_embeddings,
        config.total_vocab_size,
    ) == (grc_gguf.ARCHITECTURES[arch], V, H, KV, Dh, tied, V + K)
    tokens = np.random.default_rng(1).integers(0, V, (2, 11)).astype(np.int32)
    ours = _our_logits(config, params, tokens)
    theirs = _transformers_logits(_transformers_gguf(path), tokens)
    assert np.abs(theirs).max() > 1.0  # not a comparison of near-zero logits
    assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()
    # The weights are the ones the file stands for, in HF's order: q/k un-permuted, embedding
    # dequantized, norms as written (independent of transformers' loader).
    embed = np.asarray(params["embed"])[:V]
    np.testing.assert_array_equal(embed, ref["model.embed_tokens.weight"])
    exported = hf.to_hf_tensors(config, params)
    for name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
    ):
        np.testing.assert_array_equal(exported[name], ref[name])


def test_llama3_rope_factors_become_llama3_scaling(tmp_path):
    """Llama 3.1+ files carry their rope scaling as a `rope_freqs` tensor (which transformers'
    GGUF loader drops): it loads as rope_type llama3, with HF's logits for those weights."""
    H, KV, Dh = SHAPES["llama"]
    factor, old, theta = 8.0, 8192, 10000.0
    inv = 1.0 / theta ** (np.arange(0, Dh, 2) / Dh)
    factors = []
    for f in inv:  # llama.cpp's converter: the factor each frequency's wavelength is stretched by
        wavelen = 2 * np.pi / f
        if wavelen < old / 4:
            factors.append(1.0)
        elif wavelen > old / 1:
            factors.append(factor)
        else:
            smooth = (old / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    assert 1.0 < max(factors) and min(factors) == 1.0  # the tiny head size covers all three regimes
    path = tmp_path / "llama31.gguf"
    ref = write_tiny_gguf(path, "llama", Q.Q8_0, rope_freqs=np.asarray(factors))
    config, params = hf.load_pretrained(path, num_latents=K)
    assert config.rope_scaling_dict == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": old,
    }
    hf_config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=KV,
        head_dim=Dh,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": old,
        },
    )
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in ref.items()}, strict=True)
    tokens = np.random.default_rng(2).integers(0, V, (2, 40)).astype(np.int32)
    ours = _our_logits(config, params, tokens)
    assert np.abs(ours - _transformers_logits(reference, tokens)).max() <= 1e-4


def test_weights_load_in_the_asked_dtype(tmp_path):
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_gguf(path, "llama", Q.Q8_0)
    config, params = hf.load_pretrained(path, num_latents=K, param_dtype="bfloat16", dtype="bfloat16")
    assert config.param_dtype == "bfloat16" and params["embed"].dtype == np.dtype("bfloat16")
    np.testing.assert_allclose(
        np.asarray(params["embed"][:V], np.float32), ref["model.embed_tokens.weight"], rtol=1e-2, atol=1e-3
    )


@pytest.mark.parametrize("pre,add_bos", [("smollm", False), ("llama-bpe", True), ("qwen2", False)])
def test_tokenizer_equals_transformers_gguf_tokenizer(pre, add_bos, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "qwen2" if pre == "qwen2" else "llama", Q.F32, pre=pre, add_bos=add_bos)
    ours = grc_gguf.load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=True) == theirs(text).input_ids, text
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids, text
    assert ours.encode("x", add_special_tokens=True)[0] == 1 if add_bos else True
    assert ours.token_to_id(USER_TOKEN) == V - 2 and ours.token_to_id(MISLABELLED) is None
    assert json.loads(ours.inner.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    for name in ("bos_token", "eos_token", "pad_token"):
        assert ours.hf_config[name] == getattr(theirs, name)
    ids = ours.encode(TEXTS[0])
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)


def test_special_tokens_and_chat_template(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", Q.F32)
    special = grc_gguf.read_special_tokens(path)
    assert {k: special[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template")} == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "chat_template": CHAT_TEMPLATE,
    }
    tok = grc_gguf.load_tokenizer(path)
    assert tok.special_id("eos_token") == 2 and tok.special_id("bos_token") == 1
    assert tok.hf_config["chat_template"] == CHAT_TEMPLATE


def test_engine_opens_a_gguf_file_with_its_own_eos(tmp_path):
    from grc_jax.inference import Engine

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "qwen3", Q.Q8_0)
    engine = Engine.from_pretrained(path, num_pages=64)
    assert engine.eos_id == 2 and engine.eor_id is None
    assert engine.config.vocab_size == V and engine.latent_ids == engine.config.latent_token_ids
    out = engine.generate("Who keeps an owl?", max_new_tokens=4)
    assert isinstance(out, str)


def test_training_reads_the_tokenizer_from_a_gguf_path(tmp_path):
    from grc_jax import train
    from grc_jax.train_config import defaults

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", Q.F16)
    c = defaults()
    c.model.hf_path = str(path)
    c.model.num_latents = K
    c.model.max_segment_len = 32
    c.data.train_files = str(_records(tmp_path / "train.jsonl"))
    c.data.bos_token, c.data.eos_token, c.data.pad_token = SPECIALS[1], SPECIALS[2], SPECIALS[0]
    c.data.eor_token = USER_TOKEN
    setup, params = train.prepare(c, tmp_path / "run")
    assert setup.model_config.vocab_size == V and params is not None
    assert setup.tokenizer.encode(TEXTS[0]) == grc_gguf.load_tokenizer(path).encode(TEXTS[0])
    assert (setup.build.bos_id, setup.build.eos_id, setup.build.pad_id) == (1, 2, 0)


def _records(path: Path) -> Path:
    path.write_text(json.dumps({"text": CORPUS[0]}) + "\n", encoding="utf-8")
    return path


# --- errors -------------------------------------------------------------------------------------


def _bare_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, Q | None]]) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    for name, (data, raw) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw)
    _finish(w)
    return path


@pytest.mark.parametrize("arch", ["mamba", "gpt2"])
def test_unsupported_architecture_is_named(arch, tmp_path):
    path = _bare_gguf(tmp_path / f"{arch}.gguf", arch, {"token_embd.weight": (np.zeros((8, 4), np.float32), None)})
    with pytest.raises(
        ValueError,
        match=rf"{path}: GGUF architecture '{arch}' is not supported; supported: "
        r"\['llama', 'qwen2', 'qwen3'\]",
    ):
        hf.load_pretrained(path)


def _rewrite(src: Path, out: Path, tensors) -> Path:
    """`src`'s metadata with the tensors `tensors(name, data)` gives ([] drops one, several add)."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
    for t in reader.tensors:
        for name, data, raw in tensors(t.name, np.asarray(t.data)):
            w.add_tensor(name, data, raw_dtype=raw)
    _finish(w)
    return out


def test_unsupported_quantisation_is_named(tmp_path):
    write_tiny_gguf(tmp_path / "f32.gguf", "llama", Q.F32)

    def q8_1(name, data):  # Q8_1, a type gguf cannot dequantize
        if name != "blk.0.ffn_up.weight":
            return [(name, data, None)]
        block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
        return [(name, np.zeros((data.shape[0], data.shape[1] // block * size), np.uint8), Q.Q8_1)]

    path = _rewrite(tmp_path / "f32.gguf", tmp_path / "q8_1.gguf", q8_1)
    with pytest.raises(
        ValueError,
        match=rf"{path}: tensor 'blk.0.ffn_up.weight' has type Q8_1, which the gguf "
        r"package .* cannot dequantize",
    ):
        hf.load_pretrained(path)


def test_sentencepiece_tokenizer_is_refused_by_name(tmp_path):
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"])
    w.add_tensor("token_embd.weight", np.zeros((3, 4), np.float32))
    _finish(w)
    with pytest.raises(ValueError, match=rf"{path}: tokenizer.ggml.model 'llama' is not supported"):
        grc_gguf.load_tokenizer(path)


def test_missing_and_extra_tensors_are_named(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", "llama", Q.F32)
    dropped = _rewrite(
        tmp_path / "tiny.gguf",
        tmp_path / "dropped.gguf",
        lambda name, data: [] if name == "blk.1.ffn_gate.weight" else [(name, data, None)],
    )
    with pytest.raises(ValueError, match=rf"{dropped}: tensor 'blk\.1\.ffn_gate\.weight' is missing"):
        hf.load_pretrained(dropped)
    extra = _rewrite(
        tmp_path / "tiny.gguf",
        tmp_path / "extra.gguf",
        lambda name, data: (
            [(name, data, None)]
            + ([("blk.0.attn_output.bias", np.zeros(D, np.float32), None)] if name == "output.weight" else [])
        ),
    )
    with pytest.raises(
        ValueError,
        match=rf"{extra}: tensors the LlamaForCausalLM layout does not use: "
        r"\['blk\.0\.attn_output\.bias'\]",
    ):
        hf.load_pretrained(extra)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF but not really")
    with pytest.raises(ValueError, match=rf"{path}: not a readable GGUF file"):
        hf.load_pretrained(path)
    with pytest.raises(FileNotFoundError, match="missing.gguf: file not found"):
        hf.load_pretrained(tmp_path / "missing.gguf")


def test_describe_cli(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "qwen2", Q.Q4_0, tied=True)
    run = subprocess.run(
        [sys.executable, "-m", "grc_jax.gguf", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["architecture"] == "qwen2" and info["config"]["tie_word_embeddings"] is True
    assert info["tensor_types"]["Q4_0"] > 0 and info["special_tokens"]["eos_token_id"] == 2
    bad = subprocess.run(
        [sys.executable, "-m", "grc_jax.gguf", str(tmp_path / "nope.gguf")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


# --- the real model (the smollm2 extra) ----------------------------------------------------------


def _smollm2() -> Path:
    try:
        return assets.smollm2_135m_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"the smollm2 extra is not installed ({e})")


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2()
    from grc_jax.inference import Engine

    engine = Engine.from_pretrained(path, num_pages=256)
    reference = _transformers_gguf(path)
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return path, engine, reference, ref_tok


@pytest.mark.slow  # real-model load or whole training runs: 15-30 s each
def test_smollm2_logits_equal_transformers(smollm2):
    _, engine, reference, ref_tok = smollm2
    c = engine.config
    assert (
        c.architecture,
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.vocab_size,
        c.tie_word_embeddings,
        c.rope_theta,
    ) == ("LlamaForCausalLM", 30, 576, 9, 3, 49152, True, 1e5)
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = engine.tokenizer.encode(text)
    assert ids == ref_tok(text).input_ids
    ours = _our_logits(c, engine.params, np.asarray([ids], np.int32))
    theirs = _transformers_logits(reference, np.asarray([ids]))
    scale = np.abs(theirs).max()
    assert scale > 10 and np.abs(ours - theirs).max() <= 1e-3 * scale, (np.abs(ours - theirs).max(), scale)


@pytest.mark.slow  # real-model load or whole training runs: 15-30 s each
def test_smollm2_greedy_chat_answer_equals_transformers(smollm2):
    _, engine, reference, ref_tok = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert engine.tokenizer.hf_config["chat_template"] == ref_tok.chat_template
    ids = ref_tok(prompt).input_ids
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2
        )[0, len(ids) :].tolist()
    theirs = ref_tok.decode(out, skip_special_tokens=True)
    ours = engine.chat(messages, max_new_tokens=12)  # the file's own template; its special tokens are tokens
    assert engine.render_chat(messages) == prompt
    assert ours == theirs and "Paris" in ours, (ours, theirs)


@pytest.mark.slow  # real-model load or whole training runs: 15-30 s each
def test_smollm2_config_resolves_smollm2_s_own_tokens(tmp_path):
    """configs/smollm2_135m.py: the file from the extra, its tokenizer and special tokens (two
    training steps cost minutes on 2 cores, so the suite stops at what training is set up with)."""
    import importlib.util

    from grc_jax import train

    path = _smollm2()
    spec = importlib.util.spec_from_file_location("smollm2_135m", ROOT / "configs" / "smollm2_135m.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert c.model.hf_path == str(path)
    # Retention data already built (its chat answers take minutes to generate): prepare mixes it in.
    for name in ("chat.jsonl", "prose.jsonl"):
        (tmp_path / "retention").mkdir(exist_ok=True)
        (tmp_path / "retention" / name).write_text('{"text": "The sea is blue."}\n')
    setup, params = train.prepare(c, tmp_path)
    questions, chat, prose = setup.mixture.split(",")
    assert questions == f"{tmp_path / 'demo_world' / 'train_questions.jsonl'}:0.75" and not setup.train_files
    assert (chat, prose) == (
        f"{tmp_path / 'retention' / 'chat.jsonl'}:0.125",
        f"{tmp_path / 'retention' / 'prose.jsonl'}:0.125",
    )
    b = setup.build
    # <|im_start|> <|im_end|> from the file's metadata; it names no pad, so the eos pads;
    # <file_sep> is the config's end-of-reasoning token
    assert (b.bos_id, b.eos_id, b.pad_id, b.eor_id) == (1, 2, 2, 5)
    assert setup.model_config.num_layers == 30 and setup.model_config.latent_token_ids == tuple(range(49152, 49160))
    assert setup.model_config.matmul_dtype == "bfloat16"  # the config's bfloat16 matmul operands reach the model
    assert params["embed"].shape == (49160, 576)
    text = "Zorvak lives in Harbour Road."
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert setup.tokenizer.encode(text) == reference(text, add_special_tokens=False).input_ids
