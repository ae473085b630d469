"""JAX's persistent compilation cache, on by default for `Engine` and `grc_jax.train`.

A 30-layer model's decode loop takes tens of seconds to compile; with the compiled programs on
disk a fresh process starts generating in a few seconds. The cache directory is, first found:

1. the `path` argument (`Engine(..., compilation_cache=PATH)`); `False` turns the cache off;
2. the environment variable `GRC_JAX_CACHE_DIR`; `off` (or `0`, `false`, empty) turns it off;
3. JAX's own setting, when the user already set one (`JAX_COMPILATION_CACHE_DIR` or
   `jax.config.update("jax_compilation_cache_dir", ...)`): left as it is;
4. `~/.cache/grc_jax/jax_cache` (under `$XDG_CACHE_HOME` when that is set).

Every program is cached, however small or quick to compile (JAX's defaults skip programs that
compile in under a second, and the decode loop is many such programs). The cache is trusted
code: keep it in a directory only you can write.

JAX's cache still makes a fresh process trace the decode loop in Python and lower it to MLIR
before it can look the compiled program up (on a 30-layer model about a quarter of the time to
the first token). `call_serialized` skips both: it keeps the compiled executable itself in
`<cache dir>/grc_jax_programs/`, under a key made of everything the program depends on (the
static arguments, every argument's shape, dtype and placement, the versions of jax, jaxlib,
flax and numpy, the backend, XLA_FLAGS, jax's settings and the source of grc_jax and
pallas_kernels). A file that is missing, unreadable or written under another key is ignored and
the program traced and compiled again. Reading an executable back still takes a second or more
on a 30-layer model, so `prefetch` starts it in a background thread as soon as the model's config is
known (Engine does, before its own setup), and a load touches the file: the directory keeps the
`KEEP_PROGRAMS` most recently used programs and deletes older ones when it saves a new one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import logging
import os
import pickle
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

ENV = "GRC_JAX_CACHE_DIR"
OFF = {"", "0", "off", "false", "no", "none"}

_ours: str | None = None  # the directory this module set, so that turning off undoes only our own


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "grc_jax" / "jax_cache"


def _reset() -> None:
    # JAX decides once, at the first compilation, whether the cache is used; a directory set
    # after that takes effect only once that decision is reset.
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()


def enable(path: str | os.PathLike | bool | None = None) -> str | None:
    """Applies the cache setting (see the module docstring); returns the directory in use, or
    None when the cache is off."""
    global _ours
    if path is None:
        env = os.environ.get(ENV)
        if env is not None:
            path = False if env.strip().lower() in OFF else env
    current = jax.config.jax_compilation_cache_dir
    if path is False:
        if current is not None and current == _ours:
            jax.config.update("jax_compilation_cache_dir", None)
            _ours = None
            _reset()
            return None
        return current  # a directory the user gave JAX directly stays theirs
    if path is None or path is True:
        if current is not None and current != _ours:
            return current
        path = default_dir()
    directory = str(Path(path).expanduser())
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if current != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        _reset()
    _ours = directory
    return directory


# --- serialized programs ----------------------------------------------------------------

PROGRAMS_DIR = "grc_jax_programs"
KEEP_PROGRAMS = 32  # serialized programs kept, the most recently used (each a few MB)
_MAGIC = b"GRC_JAX_PROGRAM 1\n"
# Settings that change how programs are logged or cached, never what they compute.
_IGNORED_SETTINGS = (
    "compilation_cache",
    "persistent_cache",
    "log_compiles",
    "logging_level",
    "debug_log_modules",
    "explain_cache_misses",
)
STATS: collections.Counter = collections.Counter()  # loaded / saved / rejected / compiled (tests, benchmarks)
_log = logging.getLogger(__name__)
_programs: dict[tuple, Any] = {}  # this process's executables, by (name, statics, argument signature)
_programs_lock = threading.Lock()
_prefetched: dict[Path, concurrent.futures.Future] = {}  # path -> (key, executable) or None
_prefetcher: concurrent.futures.ThreadPoolExecutor | None = None


def programs_dir() -> Path | None:
    """Where serialized programs live: inside JAX's cache directory; None when it is off."""
    current = jax.config.jax_compilation_cache_dir
    return None if current is None else Path(current) / PROGRAMS_DIR


def call_serialized(name: str, jitted: Callable, static: Sequence[Any], dynamic: Sequence[Any]) -> Any:
    """`jitted(*static, *dynamic)`, with the compiled program read from (or written to) the
    programs directory, so that a fresh process neither traces nor lowers it. `static` are the
    jitted function's leading static arguments (hashable, with a repr that names every field);
    `dynamic` its array arguments. Without a cache directory, or with arguments spread over more
    than one device, it is the plain call."""
    directory = programs_dir()
    leaves = jax.tree.leaves(dynamic)
    if directory is None or not all(isinstance(x, jax.Array) for x in leaves):
        return jitted(*static, *dynamic)
    devices = {d for x in leaves for d in x.sharding.device_set}
    if len(devices) != 1:
        return jitted(*static, *dynamic)
    signature = (name, tuple(static), jax.tree.structure(dynamic), tuple((jax.typeof(x), x.sharding) for x in leaves))
    with _programs_lock:
        compiled = _programs.get(signature)
        if compiled is None:
            compiled = _programs[signature] = _load_or_compile(
                name, jitted, static, dynamic, directory, next(iter(devices))
            )
    return compiled(*dynamic)


def prefetch(name: str, marker: str, device: Any = None, limit: int = 1) -> None:
    """Starts reading back, in a background thread, the `limit` most recently used serialized
    `name` programs of this source whose key contains `marker` (a model's config repr, say), so
    that the first `call_serialized` finds its executable loaded or loading. A prefetched program
    is used only when its whole key matches the call's; one never called costs only its load."""
    global _prefetcher
    directory = programs_dir()
    if directory is None or not directory.is_dir():
        return
    device = device if device is not None else jax.devices()[0]
    wanted = f"\nsource {_source_hash()}\n"
    try:
        files = sorted(directory.glob(f"{name}-*.bin"), key=lambda f: f.stat().st_mtime, reverse=True)
    except OSError:  # a file deleted while listing: another process pruning
        return
    chosen = []
    for path in files:  # the keys are read here (a few KB each); the executables in the thread
        key = _read_key(path)
        if key is not None and marker in key and wanted in key:
            chosen.append(path)
            if len(chosen) == limit:
                break
    with _programs_lock:
        if _prefetcher is None:
            _prefetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grc_jax_prefetch")
        for path in chosen:
            if path not in _prefetched:
                _prefetched[path] = _prefetcher.submit(_prefetch_one, path, device)


def _read_key(path: Path) -> str | None:
    """The key a program file was written under; None for a file that is not one."""
    try:
        with path.open("rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                return None
            return f.read(int.from_bytes(f.read(8), "little")).decode()
    except (OSError, UnicodeDecodeError):
        return None


def _prefetch_one(path: Path, device: Any) -> tuple[str, Any] | None:
    try:
        data = path.read_bytes()
        size = int.from_bytes(data[len(_MAGIC) : len(_MAGIC) + 8], "little")
        start = len(_MAGIC) + 8
        return data[start : start + size].decode(), _deserialize(data[start + size :], device)
    except Exception as e:  # damage is dealt with (and counted) by the call that needs the file
        _log.debug("%s: not prefetched (%s: %s)", path, type(e).__name__, e)
        return None


def _deserialize(blob: bytes, device: Any) -> Any:
    from jax.experimental import serialize_executable

    payload, in_tree, out_tree = pickle.loads(blob)
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree, execution_devices=[device])


def _load_or_compile(
    name: str, jitted: Callable, static: Sequence[Any], dynamic: Sequence[Any], directory: Path, device: Any
) -> Any:
    from jax.experimental import serialize_executable

    key = _key_text(name, static, dynamic)
    path = directory / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.bin"
    future = _prefetched.pop(path, None)
    found = future.result() if future is not None else None
    if found is not None and found[0] == key:
        STATS["loaded"] += 1
        STATS["prefetched"] += 1
        _touch(path)
        return found[1]
    if path.is_file():
        try:
            data = path.read_bytes()
            head = _MAGIC + len(key.encode()).to_bytes(8, "little") + key.encode()
            if not data.startswith(head):
                raise ValueError("written for another program (a stale key)")
            compiled = _deserialize(data[len(head) :], device)
            STATS["loaded"] += 1
            _touch(path)
            return compiled
        except Exception as e:  # any damage: this file is not used, the program is made again
            STATS["rejected"] += 1
            _log.warning("%s: ignoring the serialized program (%s: %s); compiling it again", path, type(e).__name__, e)
    lowered = jitted.lower(*static, *dynamic)
    # Compiled afresh, never taken from JAX's cache: an XLA:CPU executable read back from there
    # serializes without its kernels, and the file would fail when run.
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    _reset()
    try:
        compiled = lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        _reset()
    STATS["compiled"] += 1
    try:
        from grc_jax.files import atomic_write_bytes

        blob = pickle.dumps(serialize_executable.serialize(compiled))
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, _MAGIC + len(key.encode()).to_bytes(8, "little") + key.encode() + blob)
        STATS["saved"] += 1
        _prune(directory)
    except Exception as e:  # a read-only or full disk, or a backend that cannot serialize: run without
        _log.warning("could not save the compiled %s program to %s (%s: %s)", name, path, type(e).__name__, e)
    return compiled


def _touch(path: Path) -> None:
    """Marks a program used now: pruning keeps the most recently used."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves its programs
        pass


def _prune(directory: Path, keep: int | None = None) -> None:
    """Deletes all but the `keep` (KEEP_PROGRAMS) most recently used programs: each code change
    or new shape writes a new file, and nothing else ever removes the old ones."""
    keep = KEEP_PROGRAMS if keep is None else keep
    try:
        files = sorted(directory.glob("*.bin"), key=lambda f: f.stat().st_mtime, reverse=True)
        for old in files[keep:]:
            old.unlink(missing_ok=True)
    except OSError as e:  # another process pruning at the same time, or a read-only directory
        _log.debug("%s: not pruned (%s: %s)", directory, type(e).__name__, e)


def _key_text(name: str, static: Sequence[Any], dynamic: Sequence[Any]) -> str:
    """Everything a compiled program depends on, as text (stored in the file and compared whole)."""
    import flax
    import jaxlib
    import numpy

    leaves, treedef = jax.tree.flatten(dynamic)
    devices = sorted({d for x in leaves for d in x.sharding.device_set}, key=lambda d: d.id) or jax.devices()[:1]
    backend = devices[0].client
    settings = {k: v for k, v in sorted(jax.config.values.items()) if not any(i in k for i in _IGNORED_SETTINGS)}
    lines = [
        f"program {name}",
        f"python {sys.version.split()[0]}",
        f"jax {jax.__version__}",
        f"jaxlib {jaxlib.__version__}",
        f"flax {flax.__version__}",
        f"numpy {numpy.__version__}",
        f"backend {backend.platform} {backend.platform_version}",
        f"devices {[(d.id, d.device_kind) for d in devices]}",
        f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')}",
        f"settings {settings!r}",
        f"source {_source_hash()}",
        f"static {[repr(a) for a in static]!r}",
        f"tree {treedef}",
    ]
    lines += [f"arg {jax.typeof(x)} weak={jax.typeof(x).weak_type} {x.sharding}" for x in leaves]
    return "\n".join(lines)


_source: str | None = None


def _source_hash() -> str:
    """A hash of every Python file of grc_jax and pallas_kernels: any code change is a new key."""
    global _source
    if _source is None:
        root = Path(__file__).resolve().parents[1]
        digest = hashlib.sha256()
        for package in ("grc_jax", "pallas_kernels"):
            for file in sorted((root / package).rglob("*.py")):
                digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
        _source = digest.hexdigest()
    return _source
