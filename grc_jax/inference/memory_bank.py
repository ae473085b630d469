"""The memory bank: latent memories (per-layer K/V of K latents) and their embeddings, by id.

Ids are integers that are never reused, so a removed id stays unknown. `replace` bumps a
memory's version; `pool_key` names (bank, id, version), which is what the page pool caches by,
so a replaced memory is never served from stale pages.

On disk a bank is either
- one `.npz` file (`save`), written whole; or
- a directory (`MemoryBank.open`, what the server keeps): `bank.json` (format, spec, next id)
  and one safetensors file per memory under `memories/` (keys and values in the bank's dtype,
  bfloat16 stored natively, the embedding in float32; id, version and text in the metadata).
  A bank opened on a directory writes every change through before the call returns: an add
  writes the new memories' files and then `bank.json`, a replace rewrites one file, a remove
  deletes files; no change rewrites the whole bank.
  Opening a directory reads each file's header and embedding only (search and listing work at
  once); a memory's keys and values are read from its file when first used, and kept in a
  least-recently-used cache of `kv_cache_bytes` (the page pool holds what decoding reads, so
  the cache only spares re-reads). A bank of 100k memories starts without reading 180 GB.
Every file is written by `atomic_write`: a temporary file beside the target, flushed to disk and
moved over it with `os.replace`, so a crash mid-save leaves the previous file whole. `load` reads
both forms and checks the ids (unique, below the next id) and that every list is as long as the
ids.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import threading
import uuid
import zipfile
from pathlib import Path
from typing import Any, Hashable, Sequence

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from grc_jax.config import ModelConfig
from grc_jax.files import atomic_write, sync_directory

FORMAT_VERSION = 2  # 2 records the model fields of BankSpec; format-1 banks still load
DIR_FORMAT = "grc_jax memory bank directory"
DIR_FORMAT_VERSION = 1
INDEX_FILE = "bank.json"
MEMORY_DIR = "memories"
_ARRAY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
KV_CACHE_BYTES = 256 << 20  # the default bound on keys and values read from a bank directory and kept


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
        return cls(
            config.num_layers,
            config.num_latents,
            config.num_kv_heads,
            config.head_dim,
            config.embed_dim or config.hidden_size,
            config.dtype,
            config.max_segment_len,
            rope,
            config.pooling,
            weights_fingerprint(config, params) if params is not None else None,
        )

    @property
    def memory_shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_latents, self.num_kv_heads, self.head_dim)

    def check_same(self, other: "BankSpec", what: str) -> None:
        """Raises ValueError naming every field where `other` (the model) differs."""
        diffs = [
            f"{f.name}={getattr(self, f.name)} vs {getattr(other, f.name)}"
            for f in dataclasses.fields(self)
            if None not in (getattr(self, f.name), getattr(other, f.name))
            and getattr(self, f.name) != getattr(other, f.name)
        ]
        if diffs:
            raise ValueError(
                f"{what} does not match the model: {', '.join(diffs)} (bank vs model); "
                "recompress its documents with this model"
            )


def weights_fingerprint(config: ModelConfig, params: Any) -> str:
    """A short hash of the weights a memory starts from: the meta latent rows of the embedding
    and the first layer's key and value projections (cheap to read, and changed by any training)."""
    digest = hashlib.sha256()
    for array in (params["embed"][config.vocab_size :], params["layers"]["k_proj"][0], params["layers"]["v_proj"][0]):
        digest.update(np.ascontiguousarray(np.asarray(array, np.float32)).tobytes())
    return digest.hexdigest()[:16]


class Memory:
    """One memory: its embedding (float32 [embed_dim]), text and version, and its keys and
    values ([layers, K, kv_heads, head_dim] each). These are held in memory, or, for a memory of
    a bank directory, read from its file when first asked for (through the bank's cache)."""

    __slots__ = ("embedding", "text", "version", "_kv", "_file", "_cache")

    def __init__(
        self,
        keys: np.ndarray | None,
        values: np.ndarray | None,
        embedding: np.ndarray,
        text: str | None = None,
        version: int = 0,
        *,
        file: Path | None = None,
        cache: _KVCache | None = None,
    ):
        if (keys is None) == (file is None):
            raise ValueError("a memory needs its keys and values, or the file that holds them (not both)")
        self.embedding, self.text, self.version = embedding, text, version
        self._kv = None if keys is None else (keys, values)
        self._file, self._cache = file, cache

    @property
    def keys(self) -> np.ndarray:
        return self.kv()[0]

    @property
    def values(self) -> np.ndarray:
        return self.kv()[1]

    @property
    def on_disk(self) -> bool:
        """Whether keys and values are read from a file (lazily) rather than held here."""
        return self._kv is None

    def kv(self) -> tuple[np.ndarray, np.ndarray]:
        if self._kv is not None:
            return self._kv
        return self._cache.get(self._file, self.version)


class _KVCache:
    """Keys and values read from memory files, least recently used dropped past `max_bytes`.
    An entry remembers its version: a replaced memory's old contents are never served."""

    def __init__(self, spec: BankSpec, max_bytes: int):
        self.spec, self.max_bytes = spec, max_bytes
        self._entries: collections.OrderedDict[Path, tuple[int, np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the engine thread reads; a handler thread may too

    def get(self, file: Path, version: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            entry = self._entries.get(file)
            if entry is not None and entry[0] == version:
                self._entries.move_to_end(file)
                return entry[1], entry[2]
        kv = _read_kv(file, self.spec, version)
        self.put(file, version, kv)
        return kv

    def put(self, file: Path, version: int, kv: tuple[np.ndarray, np.ndarray]) -> None:
        with self._lock:
            self._pop(file)
            size = kv[0].nbytes + kv[1].nbytes
            if size > self.max_bytes:
                return
            self._entries[file] = (version, *kv)
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._pop(next(iter(self._entries)))

    def drop(self, file: Path) -> None:
        with self._lock:
            self._pop(file)

    def _pop(self, file: Path) -> None:
        entry = self._entries.pop(file, None)
        if entry is not None:
            self._bytes -= entry[1].nbytes + entry[2].nbytes


class MemoryBank:
    """Memories by id, with a cosine-similarity search over their embeddings."""

    def __init__(self, spec: BankSpec, kv_cache_bytes: int = KV_CACHE_BYTES):
        self.spec = spec
        self._cache = _KVCache(spec, kv_cache_bytes)  # keys and values of memories read from files
        self.uid = uuid.uuid4().hex  # tells banks apart in the page pool's cache
        self._memories: dict[int, Memory] = {}
        self._next_id = 0
        self._matrix: tuple[np.ndarray, np.ndarray] | None = None  # (ids, embeddings), rebuilt on change
        self._unit: np.ndarray | None = None  # the embeddings at unit length
        self.directory: Path | None = None  # with `open`: every change is written here before it returns

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

    @property
    def next_id(self) -> int:
        return self._next_id

    # --- edits -----------------------------------------------------------------------------

    def add(
        self, keys: np.ndarray, values: np.ndarray, embeddings: np.ndarray, texts: Sequence[str | None] | None = None
    ) -> list[int]:
        """Adds n memories (keys/values [n, layers, K, kv_heads, head_dim], embeddings [n, dim])."""
        keys, values, embeddings = self._check(keys, values, embeddings)
        n = keys.shape[0]
        texts = list(texts) if texts is not None else [None] * n
        if len(texts) != n:
            raise ValueError(f"{len(texts)} texts for {n} memories")
        ids = list(range(self._next_id, self._next_id + n))
        new = {memory_id: Memory(keys[i], values[i], embeddings[i], texts[i]) for i, memory_id in enumerate(ids)}
        if self.directory is not None:  # on disk first: a failed write leaves the bank as it was
            for memory_id, memory in new.items():
                self._write_memory(memory_id, memory)
            self._write_index(self._next_id + n)
            new = {memory_id: self._on_disk(memory_id, memory) for memory_id, memory in new.items()}
        self._memories.update(new)
        self._next_id += n
        self._matrix = self._unit = None
        return ids

    def remove(self, ids: Sequence[int]) -> None:
        ids = list(ids)
        self._need(ids)
        for memory_id in ids:
            if self.directory is not None:
                self._memory_file(memory_id).unlink(missing_ok=True)
                self._cache.drop(self._memory_file(memory_id))
            del self._memories[memory_id]
        if self.directory is not None:
            sync_directory(self.directory / MEMORY_DIR)
        self._matrix = self._unit = None

    def replace(
        self, memory_id: int, keys: np.ndarray, values: np.ndarray, embedding: np.ndarray, text: str | None = None
    ) -> None:
        """New contents under an existing id (a new version of it)."""
        self._need([memory_id])
        k, v, e = self._check(np.asarray(keys)[None], np.asarray(values)[None], np.asarray(embedding)[None])
        old = self._memories[memory_id]
        memory = Memory(k[0], v[0], e[0], text, old.version + 1)
        if self.directory is not None:
            self._write_memory(memory_id, memory)
            self._cache.drop(self._memory_file(memory_id))
            memory = self._on_disk(memory_id, memory)
        self._memories[memory_id] = memory
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
        kvs = [self._memories[i].kv() for i in ids]  # a memory of a bank directory is read here, once
        return np.stack([k for k, _ in kvs]), np.stack([v for _, v in kvs])

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], embeddings float32 [n, dim]) in id order."""
        if self._matrix is None:
            ids = np.asarray(sorted(self._memories), np.int64)
            matrix = (
                np.stack([self._memories[i].embedding for i in ids])
                if len(ids)
                else np.zeros((0, self.spec.embed_dim), np.float32)
            )
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
        meta = {
            "format_version": FORMAT_VERSION,
            "spec": dataclasses.asdict(self.spec),
            "next_id": self._next_id,
            "texts": [self._memories[i].text for i in ids],
            "versions": [self._memories[i].version for i in ids],
        }
        shape = (0, *self.spec.memory_shape)
        stack = lambda name: (
            np.stack([getattr(self._memories[i], name) for i in ids])
            if ids
            else np.zeros(shape, _ARRAY_DTYPES[self.spec.dtype])
        )
        arrays = {
            "meta": np.asarray(json.dumps(meta)),
            "ids": np.asarray(ids, np.int64),
            # raw bits: npz cannot name bfloat16 without pickle
            "keys": _to_bits(stack("keys")),
            "values": _to_bits(stack("values")),
            "embeddings": self.embeddings()[1],
        }
        return atomic_write(path, lambda f: _write_npz(f, arrays))

    @classmethod
    def open(cls, directory: str | Path, spec: BankSpec, kv_cache_bytes: int = KV_CACHE_BYTES) -> "MemoryBank":
        """The bank kept in `directory` (made, empty, when absent), checked against the model's
        `spec`; from now on every add, replace and remove is on disk before it returns. Keys and
        values are read when first used; at most `kv_cache_bytes` of them stay in memory."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(
                f"{directory}: a file, not a memory bank directory (a single-file .npz bank loads with "
                f"MemoryBank.load; `MemoryBank.load(FILE).save_to_directory(DIR)` converts it)"
            )
        if (directory / INDEX_FILE).is_file():
            bank = cls._load_directory(directory, spec, kv_cache_bytes=kv_cache_bytes)
        else:
            if directory.is_dir() and any(directory.iterdir()):
                raise ValueError(f"{directory}: not empty and has no {INDEX_FILE}; not a memory bank directory")
            bank = cls(spec, kv_cache_bytes)
            bank._attach(directory)
        return bank

    def save_to_directory(self, directory: str | Path) -> "MemoryBank":
        """Writes this bank as a new bank directory and returns it opened there (edits go to disk)."""
        directory = Path(directory)
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise ValueError(f"{directory}: exists and is not an empty directory")
        bank = MemoryBank(self.spec, self._cache.max_bytes)
        bank._next_id = self._next_id
        bank._attach(directory)
        for memory_id, memory in self._memories.items():
            bank._write_memory(memory_id, memory)
            bank._memories[memory_id] = bank._on_disk(memory_id, memory, keep=False)
        return bank

    @classmethod
    def load(cls, path: str | Path, expect: BankSpec | None = None) -> "MemoryBank":
        """Reads a bank; with `expect` (the model's spec), a mismatch is a clear error."""
        path = Path(path)
        if path.is_dir():
            return cls._load_directory(path, expect, attach=False)
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
        if spec.dtype not in _ARRAY_DTYPES:
            raise ValueError(f"{path}: memory dtype {spec.dtype!r} is not one of {sorted(_ARRAY_DTYPES)}")
        dtype = _ARRAY_DTYPES[spec.dtype]
        ids = arrays["ids"].tolist() if arrays["ids"].ndim == 1 else None
        if ids is None:
            raise ValueError(f"{path}: ids must be a list, got an array of shape {list(arrays['ids'].shape)}")
        _check_contents(
            path,
            ids,
            next_id,
            {
                "keys": len(arrays["keys"]),
                "values": len(arrays["values"]),
                "embeddings": len(arrays["embeddings"]),
                "texts": _length(texts),
                "versions": _length(versions),
            },
        )
        keys, values = arrays["keys"].view(dtype), arrays["values"].view(dtype)
        expected = (len(ids), *spec.memory_shape)
        for what, array in (("keys", keys), ("values", values)):
            if array.shape != expected:
                raise ValueError(f"{path}: {what} have shape {list(array.shape)}, the spec says {list(expected)}")
        for n, memory_id in enumerate(ids):
            bank._memories[memory_id] = Memory(keys[n], values[n], arrays["embeddings"][n], texts[n], versions[n])
        bank._next_id = next_id
        return bank

    @classmethod
    def _load_directory(
        cls, directory: Path, expect: BankSpec | None, attach: bool = True, kv_cache_bytes: int = KV_CACHE_BYTES
    ) -> "MemoryBank":
        index_path = directory / INDEX_FILE
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            if index.get("format") != DIR_FORMAT or index.get("format_version") != DIR_FORMAT_VERSION:
                raise ValueError(
                    f"format {index.get('format')!r} version {index.get('format_version')!r}, this "
                    f"code reads {DIR_FORMAT!r} version {DIR_FORMAT_VERSION}"
                )
            spec = BankSpec(**index["spec"])
            next_id = index["next_id"]
        except FileNotFoundError:
            raise FileNotFoundError(f"{index_path}: no memory bank index") from None
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index_path}: not a memory bank index ({e})") from None
        if expect is not None:
            spec.check_same(expect, f"memory bank {directory}")
        if spec.dtype not in _ARRAY_DTYPES:
            raise ValueError(f"{index_path}: memory dtype {spec.dtype!r} is not one of {sorted(_ARRAY_DTYPES)}")
        bank = cls(spec, kv_cache_bytes)
        memories: dict[int, Memory] = {}
        for file in sorted((directory / MEMORY_DIR).glob("*.safetensors")):
            memory_id, memory = _read_memory_header(file, spec, bank._cache)
            memories[memory_id] = memory
        # An add writes its memories before bank.json: a crash between leaves files past the
        # stored next id, which are acknowledged-or-not but whole; count them in.
        next_id = max([next_id if isinstance(next_id, int) else -1, *(i + 1 for i in memories)])
        ids = list(memories)
        _check_contents(index_path, ids, next_id, {})
        bank._memories = dict(sorted(memories.items()))
        bank._next_id = next_id
        if attach:
            bank._attach(directory)
        return bank

    # --- internals -------------------------------------------------------------------------

    def _attach(self, directory: Path) -> None:
        (directory / MEMORY_DIR).mkdir(parents=True, exist_ok=True)
        for stale in (directory / MEMORY_DIR).glob(".*.tmp"):  # a killed write's leftovers
            stale.unlink(missing_ok=True)
        self.directory = directory
        self._write_index(self._next_id)
        sync_directory(directory)

    def _memory_file(self, memory_id: int) -> Path:
        return self.directory / MEMORY_DIR / f"{memory_id:012d}.safetensors"

    def _on_disk(self, memory_id: int, memory: Memory, keep: bool = True) -> Memory:
        """`memory`, just written to its file, as a memory read from there; with `keep`, its
        keys and values go into the cache (a new memory is likely read soon)."""
        file = self._memory_file(memory_id)
        if keep:
            self._cache.put(file, memory.version, memory.kv())
        return Memory(None, None, memory.embedding, memory.text, memory.version, file=file, cache=self._cache)

    def _write_index(self, next_id: int) -> None:
        index = {
            "format": DIR_FORMAT,
            "format_version": DIR_FORMAT_VERSION,
            "spec": dataclasses.asdict(self.spec),
            "next_id": next_id,
        }
        atomic_write(self.directory / INDEX_FILE, lambda f: f.write(json.dumps(index, indent=1).encode()))

    def _write_memory(self, memory_id: int, memory: Memory) -> None:
        metadata = {
            "id": str(memory_id),
            "version": str(memory.version),
            "text": json.dumps(memory.text),
            "spec": json.dumps(dataclasses.asdict(self.spec)),
        }
        data = safetensors.numpy.save(
            {
                "keys": np.ascontiguousarray(memory.keys),
                "values": np.ascontiguousarray(memory.values),
                "embedding": np.ascontiguousarray(memory.embedding, np.float32),
            },
            metadata=metadata,
        )
        atomic_write(self._memory_file(memory_id), lambda f: f.write(data))

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
            diffs = [
                f"{name}={got} (the bank holds {want})"
                for name, got, want in zip(names, array.shape[1:], s.memory_shape)
                if got != want
            ]
            if diffs:
                raise ValueError(f"{what} do not match the bank: {', '.join(diffs)}")
        if embeddings.shape != (keys.shape[0], s.embed_dim):
            raise ValueError(f"embeddings must be [{keys.shape[0]}, {s.embed_dim}], got {list(embeddings.shape)}")
        if values.shape != keys.shape:
            raise ValueError(f"values have shape {list(values.shape)}, keys {list(keys.shape)}")
        return keys, values, embeddings


def _length(x: Any) -> int | None:
    return len(x) if isinstance(x, list) else None


def _check_contents(path: Path, ids: list, next_id: Any, lengths: dict[str, int | None]) -> None:
    """A loaded bank's ids are unique integers in [0, next_id) and every list is as long as the
    ids: otherwise the next add would overwrite a memory, or memories would get others' texts."""
    if isinstance(next_id, bool) or not isinstance(next_id, int):
        raise ValueError(f"{path}: next_id must be an integer, got {next_id!r}")
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad:
        raise ValueError(f"{path}: memory ids must be integers >= 0, got {bad[:8]}")
    repeated = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if repeated:
        raise ValueError(f"{path}: memory ids {repeated[:8]} appear more than once")
    past = [i for i in ids if i >= next_id]
    if past:
        raise ValueError(
            f"{path}: memory ids {sorted(past)[:8]} are not below next_id={next_id}; the next add would overwrite them"
        )
    wrong = {what: n for what, n in lengths.items() if n != len(ids)}
    if wrong:
        raise ValueError(
            f"{path}: {len(ids)} ids but "
            + ", ".join(f"{'no list of' if n is None else n} {what}" for what, n in wrong.items())
        )


def _read_memory_header(file: Path, spec: BankSpec, cache: _KVCache) -> tuple[int, Memory]:
    """A memory file's id, text, version and embedding, with its keys' and values' dtype and
    shape checked against `spec` from the header; the keys and values stay unread."""
    try:
        with safetensors.safe_open(file, framework="numpy") as f:
            metadata = f.metadata() or {}
            memory_id, version = int(metadata["id"]), int(metadata["version"])
            text = json.loads(metadata["text"])
            names = set(f.keys())
            for name, shape, dtype in (
                ("keys", spec.memory_shape, spec.dtype),
                ("values", spec.memory_shape, spec.dtype),
                ("embedding", (spec.embed_dim,), "float32"),
            ):
                if name not in names:
                    raise _BadFile(f"no tensor {name!r}")
                t = f.get_slice(name)
                want = _SAFETENSORS_DTYPES[dtype]
                if t.get_dtype() != want or tuple(t.get_shape()) != tuple(shape):
                    raise _BadFile(
                        f"tensor {name!r} is {t.get_dtype()} {list(t.get_shape())}, the bank's spec says "
                        f"{want} {list(shape)}"
                    )
            embedding = f.get_tensor("embedding")
    except _BadFile as e:
        raise ValueError(f"{file}: {e}") from None
    except (OSError, ValueError, KeyError, TypeError, safetensors.SafetensorError) as e:
        raise ValueError(f"{file}: not a memory file ({e!r})") from None
    if file.name != f"{memory_id:012d}.safetensors":
        raise ValueError(f"{file}: holds memory id {memory_id}, its name says otherwise")
    if not (text is None or isinstance(text, str)):
        raise ValueError(f"{file}: text must be a string or null")
    return memory_id, Memory(None, None, embedding, text, version, file=file, cache=cache)


class _BadFile(Exception):
    pass


def _read_kv(file: Path, spec: BankSpec, version: int) -> tuple[np.ndarray, np.ndarray]:
    """A memory file's keys and values (read only these tensors), checked against `spec` and
    the version the bank expects."""
    try:
        with safetensors.safe_open(file, framework="numpy") as f:
            found = int((f.metadata() or {}).get("version", -1))
            keys, values = f.get_tensor("keys"), f.get_tensor("values")
    except (OSError, ValueError, KeyError, TypeError, safetensors.SafetensorError) as e:
        raise ValueError(f"{file}: cannot read the memory's keys and values ({e!r})") from None
    if found != version:
        raise ValueError(
            f"{file}: holds version {found} of the memory, the bank expects {version} (was the bank "
            f"directory changed by another process?)"
        )
    dtype = _ARRAY_DTYPES[spec.dtype]
    for what, array in (("keys", keys), ("values", values)):
        if array.dtype != dtype or array.shape != spec.memory_shape:
            raise ValueError(
                f"{file}: {what} are {array.dtype} {list(array.shape)}, the bank's spec says "
                f"{spec.dtype} {list(spec.memory_shape)}"
            )
    return keys, values


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _to_bits(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint16) if array.dtype == ml_dtypes.bfloat16 else array


def _write_npz(file: Any, arrays: dict[str, np.ndarray]) -> None:
    np.savez(file, **arrays)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
