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
"""
from __future__ import annotations

import os
from pathlib import Path

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
