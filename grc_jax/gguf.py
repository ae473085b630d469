"""GGUF import: a llama.cpp `.gguf` file of the Llama family as (ModelConfig, params) and a Tokenizer.

Reads with the `gguf` package (llama.cpp's own Python reader) and dequantizes every tensor type
`gguf.quants` can dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_x, the K and IQ types, ...) to
float32; no torch. The architectures are llama, qwen2 and qwen3, as `general.architecture` names
them. The metadata becomes the HF `config.json` dict transformers would build, so the rest of the
loading is `grc_jax.hf`'s: same layout, same GRC additions (meta latent rows, optional embed head).

    config, params = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", num_latents=16)
    tokenizer = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")

`python -m grc_jax.gguf FILE.gguf` prints what a file holds (architecture, shapes, tensor types,
special tokens).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from grc_jax import hf, model
from grc_jax.config import ModelConfig, from_hf_config
from grc_jax.tokenizer import Tokenizer

try:
    import gguf
except ImportError:  # an optional dependency: the `hf` extra
    raise ImportError(
        "reading .gguf files needs the gguf package: pip install 'grc_jax[hf]' (or pip install 'gguf>=0.19,<0.20')"
    ) from None

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# GGUF tensor name (per layer, after "blk.N.") -> the HF name suffix `hf._layer_tensors` maps.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+ rope scaling, stored as per-frequency factors

# llama.cpp's token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

# How text is split before byte-level BPE, by `tokenizer.ggml.pre`, for the pre-tokenizers of
# Llama-family models; any other value gets GPT-2's split, as transformers' GGUF loader does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)  # Mistral's (llama architecture)
_PRE_SPLITS = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "smaug-bpe",
            "dbrx",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "kormo", "f2llmv2"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}


class GGUFFile:
    """One parsed `.gguf` file: its metadata as Python values and its tensors by name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: file not found")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, IndexError, KeyError, TypeError, OSError) as e:  # what the reader raises on a bad file
            raise ValueError(f"{self.path}: not a readable GGUF file: {e}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.get("general.architecture")

    def get(self, key: str, default: Any = ..., *, prefix: bool = False) -> Any:
        """A metadata value; `prefix` puts `<architecture>.` before the key."""
        key = f"{self.arch}.{key}" if prefix else key
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise ValueError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return field.contents()

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A tensor dequantized to float32, in numpy order (HF's [out, in] for a weight)."""
        t = self.tensors.get(name)
        if t is None:
            raise ValueError(f"{self.path}: tensor {name!r} is missing")
        try:
            # A plain ndarray view: numpy's memmap subclass makes the blockwise dequantizer ~5x slower.
            array = gguf.quants.dequantize(t.data.view(np.ndarray), t.tensor_type)
        except NotImplementedError:
            raise ValueError(
                f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which the gguf package "
                f"{_gguf_version()} cannot dequantize"
            ) from None
        array = np.asarray(array, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        if array.shape != tuple(shape):
            raise ValueError(f"{self.path}: tensor {name!r} has shape {array.shape}, expected {tuple(shape)}")
        return array


@functools.cache
def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def _open(path: str | Path | GGUFFile) -> GGUFFile:
    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    if f.arch not in ARCHITECTURES:
        raise ValueError(f"{f.path}: GGUF architecture {f.arch!r} is not supported; supported: {list(ARCHITECTURES)}")
    return f


def hf_config(path: str | Path | GGUFFile) -> dict[str, Any]:
    """The HF `config.json` dict the file's metadata describes (llama.cpp's keys, read as
    transformers reads them; the head size from `attention.key_length` where the file has it)."""
    f = _open(path)
    heads = f.get("attention.head_count", prefix=True)
    hidden = f.get("embedding_length", prefix=True)
    head_dim = (
        f.get("attention.key_length", None, prefix=True)
        or f.get("rope.dimension_count", None, prefix=True)
        or hidden // heads
    )
    rotary = f.get("rope.dimension_count", None, prefix=True)
    if rotary is not None and rotary != head_dim:
        raise ValueError(
            f"{f.path}: {f.arch}.rope.dimension_count={rotary} differs from the head size {head_dim}; "
            "partial rotary embeddings are not supported"
        )
    embed = f.tensors.get("token_embd.weight")
    if embed is None:
        raise ValueError(f"{f.path}: tensor 'token_embd.weight' is missing")
    config = {
        "architectures": [ARCHITECTURES[f.arch]],
        "model_type": f.arch,
        "vocab_size": int(embed.shape[1]),  # the embedding's rows; tokenizer.ggml.tokens may list fewer
        "hidden_size": hidden,
        "intermediate_size": f.get("feed_forward_length", prefix=True),
        "num_hidden_layers": f.get("block_count", prefix=True),
        "num_attention_heads": heads,
        "num_key_value_heads": f.get("attention.head_count_kv", heads, prefix=True),
        "head_dim": head_dim,
        "rms_norm_eps": f.get("attention.layer_norm_rms_epsilon", prefix=True),
        "rope_theta": float(f.get("rope.freq_base", 10000.0, prefix=True)),
        "max_position_embeddings": f.get("context_length", None, prefix=True),
        "hidden_act": "silu",
        # llama.cpp writes the output projection only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in f.tensors,
    }
    scaling = _rope_scaling(f, head_dim, config["rope_theta"])
    if scaling:
        config["rope_scaling"] = scaling
    for key, name in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        config[key] = f.get(f"tokenizer.ggml.{name}", None)
    return config


def _rope_scaling(f: GGUFFile, head_dim: int, theta: float) -> dict[str, Any] | None:
    kind = f.get("rope.scaling.type", "none", prefix=True)
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(f.get("rope.scaling.factor", prefix=True))}
    if kind not in ("none", ""):
        raise ValueError(f"{f.path}: {f.arch}.rope.scaling.type {kind!r} is not supported (only 'linear')")
    if _ROPE_FREQS not in f.tensors:
        return None
    # llama.cpp stores Llama 3.1's scaling as the factor each frequency's wavelength is stretched by.
    # Every Llama 3.x release uses low 1, high 4 over an 8192 context; the largest factor is `factor`.
    stored = f.tensor(_ROPE_FREQS, (head_dim // 2,))
    params = {
        "rope_type": "llama3",
        "factor": float(np.round(stored.max(), 4)),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if not np.allclose(stored, _llama3_factors(params, head_dim, theta), rtol=1e-4, atol=1e-6):
        raise ValueError(
            f"{f.path}: tensor {_ROPE_FREQS!r} is not Llama 3's rope scaling with low_freq_factor 1, "
            "high_freq_factor 4 and an 8192 context; other rope frequency factors are not supported"
        )
    return params


def _llama3_factors(p: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """The per-frequency wavelength factors llama.cpp's converter derives from Llama 3's scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    old = p["original_max_position_embeddings"]
    low, high, factor = p["low_freq_factor"], p["high_freq_factor"], p["factor"]
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes the row order llama.cpp's converter gives Llama's q/k weights (and biases).

    The converter reorders each head's rows from HF's rotate-half pairing (i, i + d/2) to
    interleaved pairs (2i, 2i + 1), the pairing of llama.cpp's rope; back to HF's order here.
    """
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@hf.ordinary_pages
def load_gguf(
    path: str | Path | GGUFFile, num_latents: int | None = None, *, max_segment_len: int | None = None, **overrides: Any
) -> tuple[ModelConfig, model.Params]:
    """(config, params) from a `.gguf` file, as `hf.load_pretrained` gives them for an HF directory.

    The model gets `num_latents` new meta latent rows (default 16) initialised from the mean
    embedding. The weights are dequantized to float32 and load in float32 unless `overrides` say
    otherwise (param_dtype, dtype, scan_layers, remat_policy, pooling, embed_dim, ...).
    """
    f = _open(path)
    fields: dict[str, Any] = {}
    if num_latents is not None:
        fields["num_latents"] = num_latents
    if max_segment_len is not None:
        fields["max_segment_len"] = max_segment_len
    config = from_hf_config(hf_config(f), source=str(f.path), **fields, **overrides)
    dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[config.param_dtype]
    D, V = config.hidden_size, config.vocab_size
    used = {_ROPE_FREQS}

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        used.add(name)
        return f.tensor(name, shape)

    params: dict[str, Any] = {
        "embed": read("token_embd.weight", (V, D)).astype(dtype),
        "final_norm": read("output_norm.weight", (D,)).astype(dtype),
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = read("output.weight", (V, D)).T.astype(dtype)
    shapes = model.param_shapes(config)["layers"]
    hf_to_gguf = {suffix: name for name, suffix in _LAYER_NAMES.items()}
    permute = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads} if f.arch == "llama" else {}
    layers = {}
    for ours, (suffix, to_ours, to_hf) in hf._layer_tensors(config).items():
        hf_shape = to_hf(np.zeros(shapes[ours].shape[1:], np.int8)).shape
        name = hf_to_gguf[suffix]
        stacked = []
        for i in range(config.num_layers):
            w = read(f"blk.{i}.{name}", hf_shape)
            if name.split(".")[0] in permute:
                w = _unpermute(w, permute[name.split(".")[0]])
            stacked.append(to_ours(w).astype(dtype))
        layers[ours] = np.stack(stacked)
    params["layers"] = layers
    unused = sorted(set(f.tensors) - used)
    if unused:
        raise ValueError(
            f"{f.path}: tensors the {config.architecture} layout does not use: {unused[:8]}"
            f"{' ...' if len(unused) > 8 else ''}"
        )
    if config.embed_dim is not None:  # a new head, as init_params would make it
        shape = (config.hidden_size, config.embed_dim)
        params["embed_head"] = np.asarray(0.02 * jax.random.normal(jax.random.key(0), shape)).astype(dtype)
    params = jax.tree.map(jnp.asarray, params)
    return config, hf._add_latent_rows(config, params)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_tokenizer(path: str | Path | GGUFFile) -> Tokenizer:
    """The file's tokenizer (byte-level BPE, `tokenizer.ggml.model` gpt2), built as transformers'
    `AutoTokenizer.from_pretrained(dir, gguf_file=...)` builds it: the vocabulary and merges, the
    split of `tokenizer.ggml.pre`, control tokens as special tokens, user-defined ones as added
    tokens, bos/eos added only where the file asks. Its `hf_config` holds the special tokens and
    the chat template, as a tokenizer_config.json would."""
    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    kind = f.get("tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise ValueError(
            f"{f.path}: tokenizer.ggml.model {kind!r} is not supported; only 'gpt2' (byte-level BPE, "
            "as Llama 3, Qwen and SmolLM files have)"
        )
    tokens: list[str] = f.get("tokenizer.ggml.tokens")
    types: list[int] = f.get("tokenizer.ggml.token_type", None) or []
    merges = [tuple(m.split(" ")) for m in f.get("tokenizer.ggml.merges", None) or []]
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # A token written outside the byte alphabet (raw text) is respelled into it, byte by byte.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    inner = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = _PRE_SPLITS.get(f.get("tokenizer.ggml.pre", None))
    if split is None:
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        inner.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    inner.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a mislabel; adding it would grow the vocabulary.
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, k in zip(tokens, types)
        if k == _CONTROL and set(t) <= alphabet
    ]
    inner.add_special_tokens(control)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, k in zip(tokens, types)
        if k == _USER_DEFINED and t in vocab
    ]
    inner.add_tokens(user)

    special = read_special_tokens(f)
    names = {}
    for name in ("bos", "eos", "unk", "pad"):
        token_id = special.get(f"{name}_token_id")
        names[f"{name}_token"] = tokens[token_id] if token_id is not None and token_id < len(tokens) else None
    add_bos = bool(special.get("add_bos_token")) and names["bos_token"] is not None
    add_eos = bool(special.get("add_eos_token")) and names["eos_token"] is not None
    single = " ".join([f"{names['bos_token']}:0"] * add_bos + ["$A:0"] + [f"{names['eos_token']}:0"] * add_eos)
    pair = " ".join([single] + [f"{names['bos_token']}:1"] * add_bos + ["$B:1"] + [f"{names['eos_token']}:1"] * add_eos)
    specials = [(names["bos_token"], special["bos_token_id"])] * add_bos + [
        (names["eos_token"], special["eos_token_id"])
    ] * add_eos
    inner.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    config = {k: v for k, v in names.items() if v is not None}
    config.update(add_bos_token=add_bos, add_eos_token=add_eos)
    if special.get("chat_template") is not None:
        config["chat_template"] = special["chat_template"]
    return Tokenizer(inner, config)


def read_special_tokens(path: str | Path | GGUFFile) -> dict[str, Any]:
    """The file's special token ids, add-bos/eos flags and chat template; absent ones are None.

    Keys: bos_token_id, eos_token_id, pad_token_id, unk_token_id, eot_token_id, eom_token_id
    (Llama 3's end of turn / end of message, where the file names them), add_bos_token,
    add_eos_token, chat_template.
    """
    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    ids = {
        f"{name}_token_id": f.get(f"tokenizer.ggml.{key}_token_id", None)
        for name, key in (
            ("bos", "bos"),
            ("eos", "eos"),
            ("pad", "padding"),
            ("unk", "unknown"),
            ("eot", "eot"),
            ("eom", "eom"),
        )
    }
    return {
        **ids,
        "add_bos_token": f.get("tokenizer.ggml.add_bos_token", None),
        "add_eos_token": f.get("tokenizer.ggml.add_eos_token", None),
        "chat_template": f.get("tokenizer.chat_template", None),
    }


def load(
    path: str | Path, num_latents: int | None = None, **kwargs: Any
) -> tuple[ModelConfig, model.Params, Tokenizer]:
    """(config, params, tokenizer) from one read of the file; kwargs go to `load_gguf`."""
    f = _open(path)
    config, params = load_gguf(f, num_latents, **kwargs)
    return config, params, load_tokenizer(f)


def describe(path: str | Path) -> dict[str, Any]:
    """What a file holds: architecture, the config it gives, tensor types, special tokens."""
    f = GGUFFile(path)
    out: dict[str, Any] = {
        "file": str(f.path),
        "architecture": f.arch,
        "tensor_types": dict(Counter(t.tensor_type.name for t in f.reader.tensors)),
    }
    if f.arch in ARCHITECTURES:
        out["config"] = hf_config(f)
    special = read_special_tokens(f)
    special["chat_template"] = special["chat_template"] is not None
    out["special_tokens"] = special
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m grc_jax.gguf FILE.gguf", file=sys.stderr)
        return 2
    try:
        print(json.dumps(describe(args[0]), indent=2))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
