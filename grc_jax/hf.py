"""Hugging Face interop: load a local HF checkpoint directory, save one transformers loads.

Reads and writes safetensors only (no torch needed). The meta latent rows follow the base
vocabulary; an exported directory records the GRC settings in `grc_config.json`.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from grc_jax import model, special_tokens
from grc_jax import special_tokens as special_tokens_lib  # save_pretrained's argument shadows the name
from grc_jax.config import DTYPES, ModelConfig, from_hf_config, grc_fields, read_json, to_hf_config
from grc_jax.errors import UserError
from grc_jax.files import default_mode, process_running
from grc_jax.special_tokens import SpecialTokens
from grc_jax.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
GRC_CONFIG_FILE = "grc_config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GRC_HEAD_FILE = "grc_head.safetensors"
CHAT_TEMPLATE_FILE = special_tokens.CHAT_TEMPLATE_FILE
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _layer_tensors(c: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
    """our layer param -> (HF name suffix, HF array -> ours, ours -> HF array)."""
    D, H, KV, Dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim

    def proj(heads):  # HF [heads*Dh, D] <-> ours [D, heads, Dh]
        return (lambda w: w.T.reshape(D, heads, Dh), lambda a: a.reshape(D, heads * Dh).T)

    def bias(heads):
        return (lambda b: b.reshape(heads, Dh), lambda a: a.reshape(heads * Dh))

    same = (lambda w: w, lambda a: a)
    transpose = (lambda w: w.T, lambda a: a.T)
    table = {
        "input_norm": ("input_layernorm.weight", *same),
        "post_attention_norm": ("post_attention_layernorm.weight", *same),
        "q_proj": ("self_attn.q_proj.weight", *proj(H)),
        "k_proj": ("self_attn.k_proj.weight", *proj(KV)),
        "v_proj": ("self_attn.v_proj.weight", *proj(KV)),
        "o_proj": ("self_attn.o_proj.weight", lambda w: w.T.reshape(H, Dh, D), lambda a: a.reshape(H * Dh, D).T),
        "gate_proj": ("mlp.gate_proj.weight", *transpose),
        "up_proj": ("mlp.up_proj.weight", *transpose),
        "down_proj": ("mlp.down_proj.weight", *transpose),
    }
    if c.qkv_bias:
        table.update(
            q_bias=("self_attn.q_proj.bias", *bias(H)),
            k_bias=("self_attn.k_proj.bias", *bias(KV)),
            v_bias=("self_attn.v_proj.bias", *bias(KV)),
        )
    if c.qk_norm:
        table.update(q_norm=("self_attn.q_norm.weight", *same), k_norm=("self_attn.k_norm.weight", *same))
    return table


class MissingTensor(UserError, KeyError):
    """A tensor the architecture needs is not in the checkpoint (a KeyError, as it always was)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class _Weights:
    """The tensors of a checkpoint directory, by HF name, read lazily from their files."""

    def __init__(self, path: Path):
        self.path = path
        index = path / INDEX_FILE
        if index.is_file():
            spec = read_json(index)
            weight_map = spec.get("weight_map") if isinstance(spec, dict) else None
            if not isinstance(weight_map, dict):
                raise UserError(f"{index}: no 'weight_map' object")
            root = path.resolve()
            for name, file in weight_map.items():
                # A shard is a file of this directory: an index must not make us read elsewhere.
                if (
                    not isinstance(file, str)
                    or not file
                    or Path(file).is_absolute()
                    or not (path / file).resolve().is_relative_to(root)
                    or (path / file).resolve() == root
                ):
                    raise UserError(f"{index}: weight_map[{name!r}] = {file!r} is not a file name inside {path}")
            self.files = {name: path / file for name, file in weight_map.items()}
        elif (path / WEIGHTS_FILE).is_file():
            with safe_open(path / WEIGHTS_FILE, framework="numpy") as f:
                self.files = {name: path / WEIGHTS_FILE for name in f.keys()}
        else:
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            if pickles:
                raise UserError(
                    f"{path}: only PyTorch pickle weights ({', '.join(pickles)}); grc_jax reads safetensors only. "
                    f"Convert once with transformers: AutoModelForCausalLM.from_pretrained('{path}')"
                    f".save_pretrained('OUT_DIR') writes model.safetensors."
                )
            raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE}")
        for file in sorted(set(self.files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{file}: weights file named in {INDEX_FILE} is missing")
        self.used: set[str] = set()

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = name if name in self.files else f"model.{name}" if f"model.{name}" in self.files else None
        if key is None:
            raise MissingTensor(f"{self.path}: tensor {name!r} not found in the checkpoint")
        with safe_open(self.files[key], framework="numpy") as f:
            array = f.get_tensor(key)
        if array.dtype.kind in "biu":  # a silent cast of an integer or bool tensor would load garbage
            raise UserError(
                f"{self.files[key]}: tensor {key!r} has dtype {array.dtype}; weights must be floating point"
            )
        if tuple(array.shape) != tuple(shape):
            raise UserError(
                f"{self.files[key]}: tensor {key!r} has shape {tuple(array.shape)}, expected {tuple(shape)}"
            )
        self.used.add(key)
        return array

    def unused(self) -> list[str]:
        return sorted(n for n in self.files if n not in self.used and not n.endswith(_IGNORED_SUFFIXES))


def read_checkpoint_config(path: str | Path) -> ModelConfig:
    """The architecture and shapes of a local HF directory or `.gguf` file, read without its
    weights (its GRC fields, if any, are not read: ModelConfig's defaults stand in)."""
    path = Path(path)
    if path.suffix == ".gguf":
        from grc_jax import gguf

        return from_hf_config(gguf.hf_config(path), source=str(path))
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    return from_hf_config(read_json(path / CONFIG_FILE), source=str(path / CONFIG_FILE))


def ordinary_pages(load: Callable) -> Callable:
    """Runs a weight loader with numpy's transparent-huge-page advice off. numpy advises huge
    pages for every large array; where the kernel then compacts memory at each first touch (THP
    `defrag` set to `madvise`, common on VMs), filling the host copies a load makes (half a
    gigabyte for a 135M model) takes seconds (figures: benchmarks/RESULTS.md, first token). The
    copies live only until they are on the device, where huge pages buy nothing."""

    @functools.wraps(load)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        multiarray = getattr(getattr(np, "_core", None), "multiarray", None)
        setter = getattr(multiarray, "_set_madvise_hugepage", None)
        if setter is None:  # a numpy without the switch: load as it advises
            return load(*args, **kwargs)
        before = setter(False)
        try:
            return load(*args, **kwargs)
        finally:
            setter(before)

    return wrapper


@ordinary_pages
def load_pretrained(
    path: str | Path, num_latents: int | None = None, *, max_segment_len: int | None = None, **overrides: Any
) -> tuple[ModelConfig, model.Params]:
    """(config, params) from a local HF directory (config.json + safetensors) or a `.gguf` file.

    A plain HF model gets `num_latents` new rows (default 16) initialised from the mean
    embedding; a directory written by `save_pretrained` keeps its own GRC settings.
    `overrides` set other ModelConfig fields (param_dtype, dtype, scan_layers, remat_policy, ...).
    Without them the weights load, and compute, in the checkpoint's dtype (`config.json`'s
    `dtype` or `torch_dtype`), as transformers loads them.
    """
    path = Path(path)
    if path.suffix == ".gguf":  # a llama.cpp file: grc_jax.gguf reads and dequantizes it
        from grc_jax import gguf

        return gguf.load_gguf(path, num_latents, max_segment_len=max_segment_len, **overrides)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    hf = read_json(path / CONFIG_FILE)
    if not isinstance(hf, dict):
        raise UserError(f"{path / CONFIG_FILE}: must hold a JSON object, got {type(hf).__name__}")
    grc_file = path / GRC_CONFIG_FILE
    grc = _read_grc_config(grc_file) if grc_file.is_file() else None
    fields: dict[str, Any] = {}
    if grc is not None:
        # What the model was trained with; asking for something else is a mistake, not a change.
        asked = {k: overrides.pop(k) for k in ("pooling", "embed_dim") if k in overrides}
        if num_latents is not None:
            asked["num_latents"] = num_latents
        for key, value in asked.items():
            if value != grc[key]:
                raise UserError(f"{grc_file}: the model was trained with {key}={grc[key]!r}, not {value!r}")
        fields = {k: grc[k] for k in ("num_latents", "max_segment_len", "pooling", "embed_dim")}
        hf = {**hf, "vocab_size": grc["base_vocab_size"]}
    elif num_latents is not None:
        fields["num_latents"] = num_latents
    if max_segment_len is not None:
        fields["max_segment_len"] = max_segment_len
    stored = hf.get("dtype") or hf.get("torch_dtype")
    if stored is not None and stored not in DTYPES and not {"param_dtype", "dtype"} <= set(overrides):
        key = "dtype" if hf.get("dtype") else "torch_dtype"
        raise UserError(
            f"{path / CONFIG_FILE}: {key} {stored!r} is not one of {tuple(DTYPES)}; pass param_dtype= "
            f"and dtype= to load it in another"
        )
    if stored in DTYPES:  # as transformers loads it: in the checkpoint's dtype, unless told otherwise
        overrides = {"param_dtype": stored, "dtype": stored, **overrides}
    config = from_hf_config(hf, source=str(path / CONFIG_FILE), **fields, **overrides)

    weights = _Weights(path)
    dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[config.param_dtype]
    stored_vocab = config.total_vocab_size if grc is not None else config.vocab_size
    D = config.hidden_size

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(weights.get(name, shape)).astype(dtype, copy=False)

    params: dict[str, Any] = {
        "embed": read("embed_tokens.weight", (stored_vocab, D)),
        "final_norm": read("norm.weight", (D,)),
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = read("lm_head.weight", (stored_vocab, D)).T
    shapes = _hf_layer_shapes(config)
    layers = {}
    for ours, (suffix, to_ours, _) in _layer_tensors(config).items():
        layers[ours] = np.stack([to_ours(read(f"layers.{i}.{suffix}", shapes[ours])) for i in range(config.num_layers)])
    params["layers"] = layers
    if config.tie_word_embeddings and "lm_head.weight" in weights.files:
        # Some tied checkpoints store the head anyway; only a copy of the embedding is harmless.
        if not np.array_equal(read("lm_head.weight", (stored_vocab, D)), params["embed"]):
            raise UserError(f"{path}: tie_word_embeddings=true, but lm_head.weight differs from embed_tokens.weight")
    unused = weights.unused()
    if unused:
        raise UserError(
            f"{path}: tensors the {config.architecture} layout does not use: {unused[:8]}"
            f"{' ...' if len(unused) > 8 else ''}"
        )
    if config.embed_dim is not None:
        if grc is not None:
            with safe_open(_need_file(path / GRC_HEAD_FILE), framework="numpy") as f:
                params["embed_head"] = f.get_tensor("embed_head").astype(dtype)
        else:  # a new head for a plain HF model, as init_params would make it
            shape = (config.hidden_size, config.embed_dim)
            params["embed_head"] = np.asarray(0.02 * jax.random.normal(jax.random.key(0), shape)).astype(dtype)
    if grc is None:
        params = _with_latent_rows(config, params)
    # One transfer for the whole tree (jnp.asarray would compile a program per distinct shape); a
    # copy, as before, never an alias of host memory that a training step could donate.
    return config, jax.device_put(params, may_alias=False)


def _with_latent_rows(config: ModelConfig, params: dict[str, Any]) -> dict[str, Any]:
    """`_add_latent_rows` on host arrays: the meta latent rows of the embedding (and untied
    head) are the base rows' mean, computed by JAX as `model.init_latent_rows` does (the same
    bits), and the rows joined on the host, not by compiled programs."""
    K = config.num_latents
    params = dict(params)
    embed = params["embed"]
    mean = np.asarray(jnp.mean(jax.device_put(embed), axis=0).astype(embed.dtype))
    params["embed"] = np.concatenate([embed, np.broadcast_to(mean, (K, embed.shape[1]))])
    if "lm_head" in params:
        head = params["lm_head"]
        mean = np.asarray(jnp.mean(jax.device_put(head), axis=1, keepdims=True).astype(head.dtype))
        params["lm_head"] = np.concatenate([head, np.broadcast_to(mean, (head.shape[0], K))], axis=1)
    return params


def _hf_layer_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The HF shape of one layer's tensor, for each of our layer params (`_layer_tensors`)."""
    D, H, KV, Dh, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    shapes = {
        "input_norm": (D,),
        "post_attention_norm": (D,),
        "q_proj": (H * Dh, D),
        "k_proj": (KV * Dh, D),
        "v_proj": (KV * Dh, D),
        "o_proj": (D, H * Dh),
        "gate_proj": (F, D),
        "up_proj": (F, D),
        "down_proj": (D, F),
        "q_bias": (H * Dh,),
        "k_bias": (KV * Dh,),
        "v_bias": (KV * Dh,),
        "q_norm": (Dh,),
        "k_norm": (Dh,),
    }
    return {name: shapes[name] for name in _layer_tensors(c)}


_GRC_KEYS = {
    "num_latents": int,
    "max_segment_len": int,
    "pooling": str,
    "embed_dim": (int, type(None)),
    "base_vocab_size": int,
}


def _read_grc_config(file: Path) -> dict[str, Any]:
    grc = read_json(file)
    if not isinstance(grc, dict):
        raise UserError(f"{file}: must hold a JSON object, got {type(grc).__name__}")
    for key, kind in _GRC_KEYS.items():
        if key not in grc:
            raise UserError(f"{file}: missing key {key!r}")
        if not isinstance(grc[key], kind) or isinstance(grc[key], bool):
            raise UserError(f"{file}: {key} has the wrong type: {grc[key]!r}")
    return grc


def _need_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    return path


def _add_latent_rows(config: ModelConfig, params: model.Params) -> model.Params:
    extra = config.num_latents
    params = dict(params)
    params["embed"] = jnp.concatenate([params["embed"], jnp.zeros((extra, config.hidden_size), params["embed"].dtype)])
    if "lm_head" in params:
        head = params["lm_head"]
        params["lm_head"] = jnp.concatenate([head, jnp.zeros((config.hidden_size, extra), head.dtype)], axis=1)
    return model.init_latent_rows(config, params)


def to_hf_tensors(config: ModelConfig, params: model.Params) -> dict[str, np.ndarray]:
    """Our params as HF-named numpy arrays, in the parameter dtype."""
    out = {
        "model.embed_tokens.weight": np.asarray(params["embed"]),
        "model.norm.weight": np.asarray(params["final_norm"]),
    }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]).T
    for ours, (suffix, _, to_hf) in _layer_tensors(config).items():
        stacked = np.asarray(params["layers"][ours])
        for i in range(config.num_layers):
            out[f"model.layers.{i}.{suffix}"] = to_hf(stacked[i])
    return {name: np.ascontiguousarray(array) for name, array in out.items()}


def save_pretrained(
    config: ModelConfig,
    params: model.Params,
    out_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    *,
    max_shard_size: int = 5 * 10**9,
    special_tokens: SpecialTokens | None = None,
) -> Path:
    """Writes a directory transformers' AutoModelForCausalLM loads with no custom code.

    With a tokenizer, the special tokens (`special_tokens`, default: what the tokenizer's own
    config names) go into config.json, generation_config.json (eos as a list when there are
    several) and tokenizer_config.json, the end-of-reasoning token into grc_config.json and the
    chat template into chat_template.jinja, so transformers and Engine need no token arguments.
    The directory is built beside `out_dir` and swapped in at the end, so a crash leaves any
    previous export readable. Weights past `max_shard_size` bytes are sharded with an index.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink():  # the link stays and what it points to is replaced (README: symlinks)
        out_dir = Path(os.path.realpath(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(
            f"{out_dir}: a file, not a directory; export into a new or empty directory, so that nothing is replaced"
        )
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / GRC_CONFIG_FILE).is_file():
        raise FileExistsError(
            f"{out_dir}: not empty and not a grc_jax export (no {GRC_CONFIG_FILE}); export into a "
            "new or empty directory, so that nothing in it is replaced"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        tmp.chmod(default_mode(directory=True))
        hf_config, grc = to_hf_config(config), grc_fields(config)
        tokens = None
        if tokenizer is not None:  # else transformers' class defaults (Llama: eos 2) would stop generation
            tokens = special_tokens if special_tokens is not None else _tokens_of(tokenizer)
            ids = tokens.ids(tokenizer)
            eos = ids["eos"][0] if len(ids["eos"]) == 1 else ids["eos"] or None
            special = {"bos_token_id": ids["bos"], "eos_token_id": eos, "pad_token_id": ids["pad"]}
            hf_config.update(special)
            (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(special, indent=2), encoding="utf-8")
            grc["eor_token"] = tokens.eor
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
        (tmp / GRC_CONFIG_FILE).write_text(json.dumps(grc, indent=2), encoding="utf-8")
        _write_shards(to_hf_tensors(config, params), tmp, max_shard_size)
        if config.embed_dim is not None:
            save_file({"embed_head": np.asarray(params["embed_head"])}, str(tmp / GRC_HEAD_FILE))
        if tokenizer is not None:
            named = special_tokens_lib.with_names(tokenizer, tokens)
            named.with_latents(config.num_latents, config.vocab_size).save(tmp)
            if tokens.chat_template is not None:
                (tmp / CHAT_TEMPLATE_FILE).write_text(tokens.chat_template, encoding="utf-8")
        for file in tmp.iterdir():  # safetensors writes 0600: a serving job under another user could not read it
            if file.is_file() and not file.is_symlink():
                file.chmod(default_mode())
        _keep_other_files(out_dir, tmp)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _tokens_of(tokenizer: Tokenizer) -> SpecialTokens:
    return special_tokens.from_tokenizer(tokenizer)


def _remove_stale_temporaries(target: Path) -> None:
    """Removes what a killed save of `target` left beside it: `.NAME.tmp-PID-*` directories of
    processes that no longer run (and of older versions, which named no process) and
    `.NAME.old-PID` ones of the two-rename swap."""
    for entry in target.parent.glob(f".{target.name}.*"):
        rest = entry.name[len(target.name) + 2 :]
        kind, _, tail = rest.partition("-")
        if kind not in ("tmp", "old") or not entry.is_dir() or entry.is_symlink():
            continue
        pid = tail.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and process_running(int(pid)):
            continue  # another process is saving the same export now
        if pid.isdigit() and int(pid) == os.getpid():
            continue  # a save of this process (another thread) is under way
        shutil.rmtree(entry, ignore_errors=True)


def _write_shards(tensors: dict[str, np.ndarray], out: Path, max_shard_size: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(a.nbytes for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")


def _keep_other_files(old: Path, new: Path) -> None:
    """Copies what a previous export's directory holds besides export files (a model card, say)."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if (new / entry.name).exists() or _is_export_file(entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


def _is_export_file(name: str) -> bool:
    """A file save_pretrained writes (a stale one, such as an old shard, is not carried over)."""
    return name.endswith(".safetensors") or name in {
        CONFIG_FILE,
        GRC_CONFIG_FILE,
        GENERATION_CONFIG_FILE,
        INDEX_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
        CHAT_TEMPLATE_FILE,
    }


def _swap_in(new: Path, target: Path) -> None:
    """Replaces `target` with `new`; a kill at any instant leaves `target` a complete export."""
    for file in new.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):  # `new` now holds the previous export
        shutil.rmtree(new, ignore_errors=True)
        return
    # No atomic exchange here: for an instant `target` is missing, the previous export kept aside.
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc < 2.28, or another C library
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (_errno.EINVAL, _errno.ENOSYS, _errno.EOPNOTSUPP):  # this file system cannot
        return False
    raise OSError(errno, f"cannot swap {a} with {b}: {os.strerror(errno)}")
