"""Decode bandwidth of hybrid paged attention against the device's measured copy bandwidth.

    python benchmarks/hybrid_paged_attention_bench.py            # default sweep
    python benchmarks/hybrid_paged_attention_bench.py --batch 64 --context 8192 --mem-slots 512

Decode reads every K/V page of every sequence once and does little math per byte, so its
roofline is HBM bandwidth. For each configuration this prints the K/V bytes one call must
read (whole pages, as the kernels fetch them; plus q and the output), the median time of a
call and the achieved bytes/s, next to the bandwidth of a large on-device array copy
(x + 1: one read and one write per element). The timed call is the whole jitted function,
page-table bookkeeping and (GPU) split combine included.

On a CPU host it runs the XLA reference on a tiny shape: a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pallas_kernels.hybrid_paged_attention import hybrid_paged_attention  # noqa: E402
from pallas_kernels.hybrid_paged_attention.dispatch import default_impl  # noqa: E402

# (batch, context tokens, memory slots per sequence)
DEFAULT_SWEEP = [(8, 4096, 0), (32, 4096, 512), (64, 8192, 512), (16, 32768, 0), (128, 2048, 2048)]
TINY_SWEEP = [(2, 64, 24)]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def decode_batch(
    *,
    batch: int,
    context: int,
    mem_slots: int,
    shared_memory: bool,
    page_size: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype,
    seed: int = 0,
) -> tuple[tuple[jax.Array, ...], int]:
    """A decode step: each sequence has `context` tokens (the new one included) in token pages
    and `mem_slots` memory slots, all pages scattered over the pool at random."""
    rng = np.random.default_rng(seed)
    mem_pages, tok_pages = cdiv(mem_slots, page_size), cdiv(context, page_size)
    mem_total = mem_pages if shared_memory else batch * mem_pages
    num_pages = mem_total + batch * tok_pages
    perm = rng.permutation(num_pages).astype(np.int32)
    mem_ids = perm[:mem_total].reshape(-1, mem_pages) if mem_pages else np.zeros((1, 0), np.int32)
    mem_ids = np.broadcast_to(mem_ids, (batch, mem_pages)) if shared_memory else mem_ids
    tok_ids = perm[mem_total:].reshape(batch, tok_pages)
    lens = np.full((mem_pages,), page_size, np.int32)
    if mem_pages:
        lens[-1] = mem_slots - (mem_pages - 1) * page_size
    width = max(mem_pages, 1)  # a zero-width table would be a different static shape
    mem_table = np.zeros((batch, width), np.int32)
    mem_lens = np.zeros((batch, width), np.int32)
    mem_table[:, :mem_pages], mem_lens[:, :mem_pages] = mem_ids, lens
    kk, kv, kq = jax.random.split(jax.random.key(seed), 3)
    pool = (num_pages, page_size, num_kv_heads, head_dim)
    args = (
        jax.random.normal(kq, (batch, num_kv_heads * group, head_dim), dtype),
        jax.random.normal(kk, pool, dtype),
        jax.random.normal(kv, pool, dtype),
        jnp.arange(batch + 1, dtype=jnp.int32),
        jnp.asarray(mem_table),
        jnp.asarray(mem_lens),
        jnp.asarray(tok_ids),
        jnp.full((batch,), context, jnp.int32),
    )
    itemsize = jnp.dtype(dtype).itemsize
    kv_bytes = 2 * batch * (mem_pages + tok_pages) * page_size * num_kv_heads * head_dim * itemsize
    qo_bytes = 2 * batch * num_kv_heads * group * head_dim * itemsize
    return args, kv_bytes + qo_bytes


def median_seconds(fn, *args, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(gib: float, dtype, iters: int) -> float:
    """Bytes/s of x + 1 over a `gib`-GiB array: reads and writes every byte once."""
    n = int(gib * 2**30) // jnp.dtype(dtype).itemsize
    x = jnp.zeros((n,), dtype)
    fn = jax.jit(lambda x: x + jnp.ones((), x.dtype))
    return 2 * n * jnp.dtype(dtype).itemsize / median_seconds(fn, x, iters=iters, warmup=2)


def parse_args(argv=None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", default=None, help="reference | tpu | gpu (default: by backend)")
    p.add_argument("--batch", type=ints, help="comma list; with --context/--mem-slots replaces the sweep")
    p.add_argument("--context", type=ints)
    p.add_argument("--mem-slots", type=ints)
    p.add_argument("--shared-memory", action="store_true", help="all sequences read one memory")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="query heads per kv head")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--pages-per-block", type=int, default=None)
    p.add_argument("--kv-splits", type=int, default=None, help="GPU only")
    p.add_argument(
        "--pv-in-kv-dtype",
        choices=["both", "on", "off"],
        default="both",
        help="Pallas impls: PV matmul in the K/V dtype, in float32, or time both",
    )
    p.add_argument(
        "--interpret", action="store_true", help="run the Pallas impl in interpret mode (CPU smoke test of this script)"
    )
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--copy-gib", type=float, default=2.0)
    p.add_argument("--json", type=Path, help="also write the rows here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    backend = jax.default_backend()
    impl = a.impl or default_impl()
    on_cpu = backend == "cpu"
    if a.batch or a.context or a.mem_slots:
        sweep = [(b, c, m) for b in a.batch or [32] for c in a.context or [4096] for m in a.mem_slots or [0]]
    else:
        sweep = TINY_SWEEP if on_cpu else DEFAULT_SWEEP
    shape_kw = dict(
        page_size=a.page_size, num_kv_heads=a.num_kv_heads, group=a.group, head_dim=a.head_dim, dtype=jnp.dtype(a.dtype)
    )
    if on_cpu:
        shape_kw.update(num_kv_heads=2, group=2, head_dim=32)
        print(
            "CPU backend: tiny smoke run of the reference, not a bandwidth measurement; --num-kv-heads, "
            "--group, --head-dim and --copy-gib are replaced by 2, 2, 32 and 0.0625."
        )
    copy_bw = copy_bandwidth(0.0625 if on_cpu else a.copy_gib, jnp.dtype(a.dtype), a.iters)
    print(
        f"backend={backend} device={jax.devices()[0].device_kind} impl={impl} "
        f"copy bandwidth={copy_bw / 1e9:.1f} GB/s  shape={shape_kw}"
    )

    variants = [{}]
    if impl != "reference":
        kw = {
            k: v
            for k, v in (("pages_per_block", a.pages_per_block), ("kv_splits", a.kv_splits if impl == "gpu" else None))
            if v
        }
        if a.interpret:
            kw["interpret"] = True
        flags = {"both": [False, True], "on": [True], "off": [False]}[a.pv_in_kv_dtype]
        variants = [dict(kw, pv_in_kv_dtype=f) for f in flags]

    rows = []
    header = (
        f"{'batch':>5} {'context':>7} {'mem':>5} {'variant':>15} {'MB read':>9} {'us':>9} {'GB/s':>8} {'% copy':>7}"
    )
    print(header)
    for batch, context, mem in sweep:
        args, nbytes = decode_batch(
            batch=batch, context=context, mem_slots=mem, shared_memory=a.shared_memory, **shape_kw
        )
        for variant in variants:
            fn = jax.jit(functools.partial(hybrid_paged_attention, impl=impl, **variant))
            sec = median_seconds(fn, *args, iters=a.iters, warmup=a.warmup)
            row = dict(
                backend=backend,
                impl=impl,
                batch=batch,
                context=context,
                mem_slots=mem,
                **{k: v for k, v in shape_kw.items() if k != "dtype"},
                dtype=a.dtype,
                variant=variant,
                bytes=nbytes,
                seconds=sec,
                bytes_per_s=nbytes / sec,
                copy_bytes_per_s=copy_bw,
                fraction_of_copy=nbytes / sec / copy_bw,
            )
            rows.append(row)
            name = {None: "xla", False: "pv f32", True: "pv in kv dtype"}[variant.get("pv_in_kv_dtype")]
            print(
                f"{batch:>5} {context:>7} {mem:>5} {name:>15} {nbytes / 1e6:>9.1f} "
                f"{sec * 1e6:>9.1f} {nbytes / sec / 1e9:>8.1f} {100 * nbytes / sec / copy_bw:>6.1f}%"
            )
        del args
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
