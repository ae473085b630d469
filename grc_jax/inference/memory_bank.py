"""The memory bank: latent memories (per-layer K/V of K latents) and their embeddings, by id.

Ids are integers that are never reused, so a removed id stays unknown. `replace` bumps a
memory's version; `pool_key` names (bank, id, version), which is what the page pool caches by,
so a replaced memory is never served from stale pages.

On disk a bank is one `.npz` file, written to a temporary file beside it and moved over it with
`os.replace`: a crash mid-save leaves the previous file whole.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Any, Hashable, Sequence

import ml_dtypes
import numpy as np

from grc_jax.config import ModelConfig
from grc_jax.files import default_mode

FORMAT_VERSION = 2  # 2 records the model fields of BankSpec; format-1 banks still load
_ARRAY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@dataclasses.dataclass(frozen=True)
class BankSpec:
    """What a memory must look like to be read by a model, and which model made it.

    Memories with the right shapes can still belong to another model: other weights, or keys
    rotated at other positions (P) or frequencies. The fields from `max_segment_len` on record
    that; None means unrecorded (a format-1 bank, or a spec built by hand) and is not compared.
    """

    num_layers: int
    num_latents: int
    num_kv_heads: int
    head_dim: int
    embed_dim: int
    dtype: str = "float32"
    max_segment_len: int | None = None
    rope: str | None = None  # rope_theta and rope_scaling, as JSON
    pooling: str | None = None
    weights: str | None = None  # `weights_fingerprint` of the model

    @classmethod
    def of(cls, config: ModelConfig, params: Any = None) -> "BankSpec":
        """The spec of `config`'s memories; with `params`, tied to those weights too."""
        rope = json.dumps({"rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling_dict}, sort_keys=True)
        return cls(config.num_layers, config.num_latents, config.num_kv_heads, config.head_dim,
                   config.embed_dim or config.hidden_size, config.dtype, config.max_segment_len, rope,
                   config.pooling, weights_fingerprint(config, params) if params is not None else None)

    @property
    def memory_shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_latents, self.num_kv_heads, self.head_dim)

    def check_same(self, other: "BankSpec", what: str) -> None:
        """Raises ValueError naming every field where `other` (the model) differs."""
        diffs = [f"{f.name}={getattr(self, f.name)} vs {getattr(other, f.name)}" for f in dataclasses.fields(self)
                 if None not in (getattr(self, f.name), getattr(other, f.name))
                 and getattr(self, f.name) != getattr(other, f.name)]
        if diffs:
            raise ValueError(f"{what} does not match the model: {', '.join(diffs)} (bank vs model); "
                             "recompress its documents with this model")


def weights_fingerprint(config: ModelConfig, params: Any) -> str:
    """A short hash of the weights a memory starts from: the meta latent rows of the embedding
    and the first layer's key and value projections (cheap to read, and changed by any training)."""
    digest = hashlib.sha256()
    for array in (params["embed"][config.vocab_size:], params["layers"]["k_proj"][0], params["layers"]["v_proj"][0]):
        digest.update(np.ascontiguousarray(np.asarray(array, np.float32)).tobytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class Memory:
    keys: np.ndarray  # [layers, K, kv_heads, head_dim]
    values: np.ndarray
    embedding: np.ndarray  # float32 [embed_dim]
    text: str | None = None
    version: int = 0


class MemoryBank:
    """Memories by id, with a cosine-similarity search over their embeddings."""

    def __init__(self, spec: BankSpec):
        self.spec = spec
        self.uid = uuid.uuid4().hex  # tells banks apart in the page pool's cache
        self._memories: dict[int, Memory] = {}
        self._next_id = 0
        self._matrix: tuple[np.ndarray, np.ndarray] | None = None  # (ids, embeddings), rebuilt on change
        self._unit: np.ndarray | None = None  # the embeddings at unit length

    @classmethod
    def for_model(cls, config: ModelConfig, params: Any = None) -> "MemoryBank":
        return cls(BankSpec.of(config, params))

    def __len__(self) -> int:
        return len(self._memories)

    def __contains__(self, memory_id: object) -> bool:
        return memory_id in self._memories

    @property
    def ids(self) -> list[int]:
        return list(self._memories)

    # --- edits -----------------------------------------------------------------------------

    def add(self, keys: np.ndarray, values: np.ndarray, embeddings: np.ndarray,
            texts: Sequence[str | None] | None = None) -> list[int]:
        """Adds n memories (keys/values [n, layers, K, kv_heads, head_dim], embeddings [n, dim])."""
        keys, values, embeddings = self._check(keys, values, embeddings)
        n = keys.shape[0]
        texts = list(texts) if texts is not None else [None] * n
        if len(texts) != n:
            raise ValueError(f"{len(texts)} texts for {n} memories")
        ids = list(range(self._next_id, self._next_id + n))
        for i, memory_id in enumerate(ids):
            self._memories[memory_id] = Memory(keys[i], values[i], embeddings[i], texts[i])
        self._next_id += n
        self._matrix = self._unit = None
        return ids

    def remove(self, ids: Sequence[int]) -> None:
        ids = list(ids)
        self._need(ids)
        for memory_id in ids:
            del self._memories[memory_id]
        self._matrix = self._unit = None

    def replace(self, memory_id: int, keys: np.ndarray, values: np.ndarray, embedding: np.ndarray,
                text: str | None = None) -> None:
        """New contents under an existing id (a new version of it)."""
        self._need([memory_id])
        k, v, e = self._check(np.asarray(keys)[None], np.asarray(values)[None], np.asarray(embedding)[None])
        old = self._memories[memory_id]
        self._memories[memory_id] = Memory(k[0], v[0], e[0], text, old.version + 1)
        self._matrix = self._unit = None

    # --- reads -----------------------------------------------------------------------------

    def get(self, memory_id: int) -> Memory:
        self._need([memory_id])
        return self._memories[memory_id]

    def pool_key(self, memory_id: int) -> Hashable:
        """What the page pool caches this memory's current contents under."""
        return (self.uid, memory_id, self.get(memory_id).version)

    def kv(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """keys, values [n, layers, K, kv_heads, head_dim] of the named memories."""
        ids = list(ids)
        self._need(ids)
        return (np.stack([self._memories[i].keys for i in ids]), np.stack([self._memories[i].values for i in ids]))

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], embeddings float32 [n, dim]) in id order."""
        if self._matrix is None:
            ids = np.asarray(sorted(self._memories), np.int64)
            matrix = (np.stack([self._memories[i].embedding for i in ids]) if len(ids)
                      else np.zeros((0, self.spec.embed_dim), np.float32))
            self._matrix = (ids, matrix)
        return self._matrix

    def search(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """ids and cosine scores [q, k] of the top_k memories per query (queries [q, dim]),
        best first; k = min(top_k, len(bank))."""
        if not len(self):
            raise ValueError("the memory bank is empty: compress or add memories before searching")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.spec.embed_dim:
            raise ValueError(f"queries must be [n, {self.spec.embed_dim}], got shape {list(queries.shape)}")
        ids, matrix = self.embeddings()
        if self._unit is None:  # cosine for embeddings of any length, computed once per change
            self._unit = _unit(matrix)
        scores = _unit(queries) @ self._unit.T
        k = min(top_k, len(ids))
        order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
        return ids[order], np.take_along_axis(scores, order, axis=-1)

    # --- disk ------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Writes the bank to one .npz file, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = sorted(self._memories)
        meta = {"format_version": FORMAT_VERSION, "spec": dataclasses.asdict(self.spec), "next_id": self._next_id,
                "texts": [self._memories[i].text for i in ids], "versions": [self._memories[i].version for i in ids]}
        shape = (0, *self.spec.memory_shape)
        stack = lambda name: (np.stack([getattr(self._memories[i], name) for i in ids]) if ids
                              else np.zeros(shape, _ARRAY_DTYPES[self.spec.dtype]))
        arrays = {"meta": np.asarray(json.dumps(meta)), "ids": np.asarray(ids, np.int64),
                  # raw bits: npz cannot name bfloat16 without pickle
                  "keys": _to_bits(stack("keys")), "values": _to_bits(stack("values")),
                  "embeddings": self.embeddings()[1]}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else default_mode())
            with os.fdopen(fd, "wb") as f:
                _write_npz(f, arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, expect: BankSpec | None = None) -> "MemoryBank":
        """Reads a bank; with `expect` (the model's spec), a mismatch is a clear error."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no memory bank file")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{path}: not a memory bank file: {e}") from None
        missing = {"meta", "ids", "keys", "values", "embeddings"} - set(arrays)
        if missing:
            raise ValueError(f"{path}: not a memory bank file (missing {sorted(missing)})")
        try:
            meta = json.loads(str(arrays["meta"]))
            version = meta["format_version"]
            if version not in (1, FORMAT_VERSION):
                raise ValueError(f"{path}: memory bank format {version}, this code reads 1 and {FORMAT_VERSION}")
            spec = BankSpec(**meta["spec"])
            texts, versions, next_id = meta["texts"], meta["versions"], meta["next_id"]
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}: not a memory bank file (bad meta: {e!r})") from None
        if expect is not None:
            spec.check_same(expect, f"memory bank {path}")
        bank = cls(spec)
        dtype = _ARRAY_DTYPES[spec.dtype]
        keys, values = arrays["keys"].view(dtype), arrays["values"].view(dtype)
        for n, memory_id in enumerate(arrays["ids"].tolist()):
            bank._memories[memory_id] = Memory(keys[n], values[n], arrays["embeddings"][n], texts[n], versions[n])
        bank._next_id = next_id
        return bank

    # --- internals -------------------------------------------------------------------------

    def _need(self, ids: Sequence[Any]) -> None:
        unknown = [i for i in ids if i not in self._memories]
        if unknown:
            raise KeyError(f"unknown memory id(s) {unknown[:8]}; the bank holds {len(self)} memories")

    def _check(self, keys, values, embeddings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = self.spec
        dtype = _ARRAY_DTYPES[s.dtype]
        keys, values = np.asarray(keys).astype(dtype), np.asarray(values).astype(dtype)
        embeddings = np.asarray(embeddings, np.float32)
        names = ("num_layers", "num_latents", "num_kv_heads", "head_dim")
        for what, array in (("keys", keys), ("values", values)):
            if array.ndim != 5:
                raise ValueError(f"{what} must be [n, layers, K, kv_heads, head_dim], got shape {list(array.shape)}")
            diffs = [f"{name}={got} (the bank holds {want})"
                     for name, got, want in zip(names, array.shape[1:], s.memory_shape) if got != want]
            if diffs:
                raise ValueError(f"{what} do not match the bank: {', '.join(diffs)}")
        if embeddings.shape != (keys.shape[0], s.embed_dim):
            raise ValueError(f"embeddings must be [{keys.shape[0]}, {s.embed_dim}], got {list(embeddings.shape)}")
        if values.shape != keys.shape:
            raise ValueError(f"values have shape {list(values.shape)}, keys {list(keys.shape)}")
        return keys, values, embeddings


def _to_bits(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint16) if array.dtype == ml_dtypes.bfloat16 else array


def _write_npz(file: Any, arrays: dict[str, np.ndarray]) -> None:
    np.savez(file, **arrays)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
