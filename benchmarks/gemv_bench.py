"""Weight-streaming speed of a batch-1 matrix-vector product on the CPU: XLA against torch, and
weight-only int8 (grc_jax/quantize.py) by the native kernel and by XLA.

    python benchmarks/gemv_bench.py

A batch-1 decode step is such products over every weight, so this bounds what the decode loop
can reach. Twelve float32 [768, 8192] weights (300 MB, larger than the caches), the product of a
[1, 768] vector with each, a tanh on each result so that no product can be skipped; GB/s =
weight bytes / the best time over --reps calls. XLA: weights stored [in, out] (this project's
layout) and [out, in]; torch: `linear` (weights [out, in]) with 1 and 2 threads. int8: the same
weights as int8 [out, in] with per-row scales (a quarter of the bytes), multiplied by the native
kernel (grc_jax/cpu_kernels/int8_matvec.cc) and by XLA's multiply-and-row-sum, the fallback where
the kernel cannot be built; GB/s there is float32-equivalent (the float weights' bytes / time), so
it compares with the float rows directly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grc_jax import quantize  # noqa: E402
from grc_jax.cpu_kernels import int8_matvec  # noqa: E402

IN, OUT, COUNT = 768, 8192, 12
BYTES = COUNT * IN * OUT * 4


def best_seconds(call, reps: int) -> float:
    call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def xla_gbps(transposed: bool, reps: int) -> float:
    shape = (OUT, IN) if transposed else (IN, OUT)
    weights = [jnp.asarray(np.random.default_rng(i).standard_normal(shape), jnp.float32) for i in range(COUNT)]
    x = jnp.ones((1, IN), jnp.float32)

    @jax.jit
    def products(x, weights):
        out = jnp.zeros((1, OUT), jnp.float32)
        for w in weights:
            out = out + jnp.tanh(jnp.einsum("bi,oi->bo", x, w) if transposed else x @ w)
        return out

    return BYTES / best_seconds(lambda: jax.block_until_ready(products(x, weights)), reps) / 1e9


def int8_gbps(native: bool, reps: int) -> float:
    rng = np.random.default_rng(0)
    weights = [quantize.quantize(jnp.asarray(rng.standard_normal((IN, OUT)), jnp.float32)) for _ in range(COUNT)]
    x = jnp.ones((1, IN), jnp.float32)

    def product(x, q, scale):
        if native:
            return int8_matvec.int8_matvec(x, q, scale)
        return jnp.sum(x[0][None, :] * q.astype(jnp.float32), axis=1)[None] * scale

    @jax.jit
    def products(x, weights):
        out = jnp.zeros((1, OUT), jnp.float32)
        for w in weights:
            out = out + jnp.tanh(product(x, w.q, w.scale))
        return out

    return BYTES / best_seconds(lambda: jax.block_until_ready(products(x, weights)), reps) / 1e9


def torch_gbps(threads: int, reps: int) -> float:
    import torch

    torch.set_num_threads(threads)
    weights = [torch.randn(OUT, IN) for _ in range(COUNT)]
    x = torch.ones(1, IN)
    with torch.no_grad():
        return BYTES / best_seconds(lambda: [torch.tanh(torch.nn.functional.linear(x, w)) for w in weights], reps) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; {COUNT} x float32 [{IN}, {OUT}] = {BYTES / 1e6:.0f} MB")
    print(f"XLA x @ W, W [in, out]:   {xla_gbps(False, args.reps):5.1f} GB/s")
    print(f"XLA W x,   W [out, in]:   {xla_gbps(True, args.reps):5.1f} GB/s")
    if int8_matvec.available():
        print(f"int8, native kernel:      {int8_gbps(True, args.reps):5.1f} GB/s float32-equivalent")
    print(f"int8, XLA row sum:        {int8_gbps(False, args.reps):5.1f} GB/s float32-equivalent")
    for threads in (1, 2):
        print(f"torch linear, {threads} thread(s): {torch_gbps(threads, args.reps):5.1f} GB/s")


if __name__ == "__main__":
    main()
