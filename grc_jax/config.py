"""The model's static description: one frozen dataclass, built from an HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from grc_jax.errors import UserError

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
POOLINGS = ("mean", "last")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MATMUL_DTYPES = ("float32", "bfloat16")

DEFAULT_NUM_LATENTS = 16
DEFAULT_MAX_SEGMENT_LEN = 512


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the model's shapes and numerics.

    `vocab_size` counts the base vocabulary only; the `num_latents` meta latent token rows
    follow it, so their ids are `vocab_size .. vocab_size + num_latents - 1`.
    """

    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02  # std of the random init; HF's name and default
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted (key, value) pairs; hashable
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    # GRC
    num_latents: int = DEFAULT_NUM_LATENTS
    max_segment_len: int = DEFAULT_MAX_SEGMENT_LEN
    pooling: str = "mean"
    embed_dim: int | None = None  # optional linear head on the pooled representation
    # Compute
    param_dtype: str = "float32"
    dtype: str = "float32"
    # The operands of the weight matmuls in training, forward and gradients ("float32" or "bfloat16";
    # the sums are float32 either way): bfloat16 is what TPUs do by default for float32 matmuls, and on
    # CPUs with AVX512-BF16 it cuts a training step by a third or more. The Engine multiplies in
    # float32 whatever it says.
    matmul_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"

    def __post_init__(self):
        # Numbers first: a string or bool here (from a hand-edited config.json) would otherwise
        # fail later as a bare TypeError, or run with a wrong value.
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "num_latents",
            "max_segment_len",
        ):
            value = getattr(self, key)
            _check(_is_int(value), f"{key} must be an integer, got {value!r}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            _check(getattr(self, key) >= 1, f"{key} must be >= 1, got {getattr(self, key)}")
        _check(
            self.embed_dim is None or (_is_int(self.embed_dim) and self.embed_dim >= 1),
            f"embed_dim must be None or an integer >= 1, got {self.embed_dim!r}",
        )
        for key in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, key)
            _check(_is_real(value), f"{key} must be a number, got {value!r}")
            _check(value > 0, f"{key} must be > 0, got {value!r}")  # NaN too
            _check(value < math.inf, f"{key} must be finite, got {value!r}")
        _check(self.architecture in ARCHITECTURES, f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
        # The architecture fixes which attention weights transformers builds: a model that has
        # other ones would export to a checkpoint transformers loads wrongly.
        for key, value in architecture_fields(self.architecture).items():
            _check(
                getattr(self, key) == value,
                f"{key}={getattr(self, key)} does not fit architecture "
                f"{self.architecture!r}: {_ARCHITECTURE_FIELD_RULES[key]}",
            )
        _check(
            self.num_heads >= 1 and self.num_kv_heads >= 1,
            f"num_heads and num_kv_heads must be >= 1, got {self.num_heads} and {self.num_kv_heads}",
        )
        _check(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}",
        )
        _check(self.initializer_range > 0, f"initializer_range must be > 0, got {self.initializer_range}")
        _check(self.num_latents >= 1, f"num_latents must be >= 1, got {self.num_latents}")
        _check(self.max_segment_len >= 1, f"max_segment_len must be >= 1, got {self.max_segment_len}")
        _check(self.pooling in POOLINGS, f"pooling {self.pooling!r} is not one of {POOLINGS}")
        _check(
            self.remat_policy in REMAT_POLICIES, f"remat_policy {self.remat_policy!r} is not one of {REMAT_POLICIES}"
        )
        for key in ("param_dtype", "dtype"):
            _check(getattr(self, key) in DTYPES, f"{key} {getattr(self, key)!r} is not one of {tuple(DTYPES)}")
        _check(
            self.matmul_dtype in MATMUL_DTYPES,
            f"matmul_dtype {self.matmul_dtype!r} is not one of {MATMUL_DTYPES}",
        )

    @property
    def total_vocab_size(self) -> int:
        return self.vocab_size + self.num_latents

    @property
    def latent_token_ids(self) -> tuple[int, ...]:
        return tuple(range(self.vocab_size, self.vocab_size + self.num_latents))

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# The ModelConfig fields an architecture fixes, and why (the attention weights transformers builds).
_ARCHITECTURE_FIELD_RULES = {
    "qkv_bias": "Qwen2ForCausalLM has q/k/v biases, the others do not",
    "qk_norm": "Qwen3ForCausalLM has q/k norms, the others do not",
}


def architecture_fields(architecture: str) -> dict[str, bool]:
    """The fields `architecture` fixes (`qkv_bias`, `qk_norm`): derived from it, never chosen."""
    return {"qkv_bias": architecture == "Qwen2ForCausalLM", "qk_norm": architecture == "Qwen3ForCausalLM"}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def from_hf_config(hf: dict[str, Any], *, source: str = "config.json", **grc: Any) -> ModelConfig:
    """Reads an HF `config.json` dict (transformers 4.x or 5.x layout); `grc` sets GRC fields."""
    if not isinstance(hf, dict):
        raise UserError(f"{source}: must hold a JSON object, got {type(hf).__name__}")
    for key in _HF_INTS:
        if key in hf and hf[key] is not None and not _is_int(hf[key]):
            raise UserError(f"{source}: {key} must be an integer, got {hf[key]!r}")
    for key in _HF_REALS:
        if key in hf and hf[key] is not None and not _is_real(hf[key]):
            raise UserError(f"{source}: {key} must be a number, got {hf[key]!r}")
    try:
        return _from_hf_config(hf, source, **grc)
    except UserError as e:  # ModelConfig names its own field; say the file's key
        message = str(e)
        for ours, theirs in _HF_NAMES.items():
            if message.startswith(f"{ours} "):
                message = theirs + message[len(ours) :]
        raise UserError(message if message.startswith(source) else f"{source}: {message}") from None


_HF_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
_HF_REALS = ("rms_norm_eps", "rope_theta", "initializer_range")
_HF_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
}


def _from_hf_config(hf: dict[str, Any], source: str, **grc: Any) -> ModelConfig:
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise UserError(f"{source}: unsupported architectures {archs!r}; supported: {list(ARCHITECTURES)}")
    arch = archs[0]

    def need(key: str) -> Any:
        if key not in hf:
            raise UserError(f"{source}: missing key {key!r}")
        return hf[key]

    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("mlp_bias"):
        raise UserError(f"{source}: mlp_bias=true is not supported")
    if hf.get("use_sliding_window"):
        raise UserError(f"{source}: use_sliding_window=true is not supported")
    if hf.get("attention_bias") and arch != "Qwen2ForCausalLM":
        raise UserError(f"{source}: attention_bias=true is not supported for {arch} (it biases o_proj too)")
    num_heads = need("num_attention_heads")
    rope = dict(hf.get("rope_parameters") or {})  # transformers 5.x
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if not rope and hf.get("rope_scaling"):  # transformers 4.x
        rope = dict(hf["rope_scaling"])
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UserError(f"{source}: rope type {rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}")
    rope_scaling = None if rope_type == "default" else tuple(sorted({**rope, "rope_type": rope_type}.items()))
    return ModelConfig(
        architecture=arch,
        vocab_size=need("vocab_size"),
        hidden_size=need("hidden_size"),
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or need("hidden_size") // num_heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        initializer_range=hf.get("initializer_range", 0.02),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **architecture_fields(arch),
        **grc,
    )


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """The `config.json` transformers needs; the vocabulary includes the meta latent rows."""
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
    rope = {"rope_theta": config.rope_theta, "rope_type": "default"}
    rope.update(config.rope_scaling_dict or {})
    hf = {
        "architectures": [config.architecture],
        "model_type": model_type[config.architecture],
        "vocab_size": config.total_vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "initializer_range": config.initializer_range,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": max(2048, 4 * (config.max_segment_len + config.num_latents)),
        "torch_dtype": config.param_dtype,
        "dtype": config.param_dtype,
    }
    if config.rope_scaling:
        hf["rope_scaling"] = dict(rope)
    if config.architecture != "Qwen2ForCausalLM":
        hf["attention_bias"] = False
    if config.architecture == "LlamaForCausalLM":
        hf["mlp_bias"] = False
    return hf


def grc_fields(config: ModelConfig) -> dict[str, Any]:
    """What `grc_config.json` holds: the GRC settings transformers knows nothing of."""
    return {
        "num_latents": config.num_latents,
        "max_segment_len": config.max_segment_len,
        "pooling": config.pooling,
        "embed_dim": config.embed_dim,
        "base_vocab_size": config.vocab_size,
        "latent_token_ids": list(config.latent_token_ids),
    }


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8: {e.reason} at byte {e.start}") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None
