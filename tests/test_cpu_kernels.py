"""Native CPU kernels (grc_jax/cpu_kernels) against their plain-XLA references."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax import quantize
from grc_jax.cpu_kernels import int8_matvec

REPO = Path(__file__).resolve().parents[1]


def _operands(rows: int, inp: int, out: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(rows, inp)), jnp.float32)
    q = jnp.asarray(rng.integers(-127, 128, size=(out, inp)), jnp.int8)
    scale = jnp.asarray(rng.random(out) + 0.01, jnp.float32)
    return x, q, scale


@pytest.fixture(scope="module")
def native():
    compiler = int8_matvec.compiler()
    if shutil.which(compiler) is None:  # the library's fallback then serves; its test below still runs
        pytest.skip(f"no C++ compiler ({compiler!r}) on this machine: the native kernel cannot be built")
    if not int8_matvec.available():
        pytest.fail(f"{compiler} is here but the native int8 kernel did not build or load (see the warning)")


@pytest.mark.parametrize(
    "rows, inp, out",
    [(1, 576, 1536), (1, 1536, 576), (3, 576, 192), (4, 64, 300), (8, 576, 49160), (16, 33, 65), (5, 7, 3)],
)
def test_int8_matvec_equals_the_xla_reference(native, rows, inp, out):
    x, q, scale = _operands(rows, inp, out)
    got = jax.jit(int8_matvec.int8_matvec)(x, q, scale)
    want = int8_matvec.reference(x, q, scale)
    assert got.shape == want.shape == (rows, out) and got.dtype == jnp.float32
    # float32 sums in another order: relative to the size of the terms summed
    bound = 1e-6 * float(jnp.abs(x).max()) * 127 * inp * float(scale.max())
    assert float(jnp.abs(got - want).max()) <= bound


def test_int8_matvec_under_scan_and_vmap(native):
    """Inside the decode loop the weights of each layer come from a scan; a vmap runs it per slice."""
    x, _, _ = _operands(2, 96, 40)
    qs = jnp.stack([_operands(2, 96, 40, seed=s)[1] for s in range(3)])
    scales = jnp.stack([_operands(2, 96, 40, seed=s)[2] for s in range(3)])

    def chain(kernel):
        def step(h, w):
            q, s = w
            return jnp.tanh(kernel(h, q, s) @ jnp.ones((40, 96)) / 40), None

        return jax.jit(lambda h: jax.lax.scan(step, h, (qs, scales))[0])

    np.testing.assert_allclose(chain(int8_matvec.int8_matvec)(x), chain(int8_matvec.reference)(x), rtol=1e-5, atol=1e-5)
    batched = jax.jit(jax.vmap(int8_matvec.int8_matvec, in_axes=(None, 0, 0)))(x, qs, scales)
    want = jnp.stack([int8_matvec.reference(x, qs[i], scales[i]) for i in range(3)])
    np.testing.assert_allclose(batched, want, rtol=1e-5, atol=1e-3)


def test_decode_sized_int8_products_call_the_native_kernel(native):
    """quantize.int8_dense sends products of up to MATVEC_ROWS rows to the kernel, larger ones to
    the dequantized float dot; both equal the dequantized weight's product."""
    w = jnp.asarray(np.random.default_rng(1).normal(size=(64, 4, 8)), jnp.float32)  # [in, heads, head_dim]
    iw = quantize.quantize(w, 1)
    for lead, native_call in (((1, 1), True), ((2, 8), True), ((4, 8), False)):  # 1, 16 and 32 rows
        x = jnp.asarray(np.random.default_rng(2).normal(size=(*lead, 64)), jnp.float32)
        fn = jax.jit(lambda x: quantize.int8_dense(x, iw, 1, jnp.float32))
        hlo = fn.lower(x).as_text()
        rows = int(np.prod(lead))
        assert (int8_matvec.TARGET in hlo) == native_call, (lead, rows)
        want = jnp.einsum("...i,iho->...ho", x, iw.dequantize().reshape(64, 4, 8), precision="highest")
        np.testing.assert_allclose(fn(x), want, rtol=1e-5, atol=1e-4)


def test_the_library_is_built_once_and_a_missing_compiler_falls_back_with_a_warning(tmp_path):
    """A fresh cache directory: the first process compiles the kernel, the second loads the same
    file; with no compiler, int8 products still give the reference's answer, by XLA."""
    script = (
        "import warnings, jax, jax.numpy as jnp, numpy as np\n"
        "from grc_jax import quantize\n"
        "from grc_jax.cpu_kernels import int8_matvec\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    ok = int8_matvec.available()\n"
        "w = quantize.quantize(jnp.asarray(np.random.default_rng(0).normal(size=(48, 20)), jnp.float32))\n"
        "x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 48)), jnp.float32)\n"
        "got = jax.jit(lambda x: quantize.int8_dense(x, w, 1, jnp.float32))(x)\n"
        "err = float(jnp.abs(got - int8_matvec.reference(x, w.q, w.scale)).max())\n"
        "print(ok, err < 1e-4, '|'.join(str(c.message) for c in caught))\n"
    )

    def run(**env):
        done = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path), "JAX_PLATFORMS": "cpu", **env},
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip()

    no_compiler = run(CXX=str(tmp_path / "no-such-compiler"))
    assert no_compiler.startswith("False True int8 decode uses XLA's slower path: no C++ compiler"), no_compiler
    if shutil.which(int8_matvec.compiler()) is None:
        pytest.skip("no C++ compiler on this machine: the fallback is checked, the build cannot be")
    assert run() == "True True"
    built = list((tmp_path / "grc_jax" / "cpu_kernels").glob("int8_matvec-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert run() == "True True" and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
