"""The int8 matrix-vector product of decode on a CPU: int8_matvec.cc through XLA's FFI.

`int8_matvec(x, q, scale)` is `x @ (q.T * scale)` for x float32 [rows, in], q int8 [out, in] and
scale float32 [out] (a `grc_jax.quantize.Int8Weight`); `reference` is the same in plain XLA.
The kernel is compiled once per machine from its source with the host's C++ compiler (`$CXX`,
else `g++`) into `~/.cache/grc_jax/cpu_kernels/` (under `$XDG_CACHE_HOME` when set); the file
name carries the hash of the source, the flags, the jax version and the CPU's features. Where no
compiler works, `available()` is False, one warning says why, and callers use the reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from grc_jax import compile_cache, files

SOURCE = Path(__file__).with_suffix(".cc")
TARGET = "grc_int8_matvec"
FLAGS = ("-O3", "-march=native", "-ffast-math", "-std=c++17", "-shared", "-fPIC", "-w")


def cache_dir() -> Path:
    return compile_cache.default_dir().parent / "cpu_kernels"  # beside JAX's cache, under grc_jax's


def compiler() -> str:
    return os.environ.get("CXX") or "g++"


def _cpu_features() -> bytes:
    """What -march=native compiles for: a library built on another kind of CPU (a cache directory
    shared between machines) must not be loaded here."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return platform.machine().encode()


def _library_path(compiler: str) -> Path:
    parts = [SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(), jax.__version__.encode()]
    key = hashlib.sha256(b"\0".join([*parts, _cpu_features()])).hexdigest()[:16]
    return cache_dir() / f"int8_matvec-{key}.so"


def _compile(compiler: str, out: Path) -> None:
    """Compiles into a temporary file and renames it over `out`, so that a killed build or a
    second process building at once never leaves a partial library where a loader looks."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(built, out)
        files.sync_directory(out.parent)


@functools.cache
def available() -> bool:
    """Whether the native kernel is built (building it on first use) and registered with XLA."""
    cxx = compiler()
    if shutil.which(cxx) is None:
        warnings.warn(
            f"int8 decode uses XLA's slower path: no C++ compiler ({cxx!r}) to build {SOURCE.name}", stacklevel=2
        )
        return False
    path = _library_path(cxx)
    try:
        if not path.is_file():
            _compile(cxx, path)
        library = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.GrcInt8Matvec), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(
            f"int8 decode uses XLA's slower path: building or loading {SOURCE.name} failed: {e}", stacklevel=2
        )
        return False
    return True


def int8_matvec(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """float32 [rows, in] x int8 [out, in] (per-row float32 scale [out]) -> float32 [rows, out],
    by the native kernel (`available()` must be True)."""
    out = jax.ShapeDtypeStruct((x.shape[0], q.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x.astype(jnp.float32), q, scale.astype(jnp.float32))


def reference(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """The same product in plain XLA: the weight dequantized, then a float32 dot."""
    y = jax.lax.dot_general(x.astype(jnp.float32), q.astype(jnp.float32), (((1,), (1,)), ((), ())))
    return y * scale
