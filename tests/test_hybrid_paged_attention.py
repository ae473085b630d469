"""Hybrid paged attention: reference vs a literal numpy loop, Pallas TPU/GPU kernels vs reference.

The TPU kernel runs under the TPU interpreter (~100x slower than generic interpret), so shapes
are tiny and the axes (batch kind, memory, GQA ratio, page size, dtype) are covered pairwise
rather than as a cartesian product.

Tolerances:
- float32 (f32 in, f32 out): the implementations differ only in summation order and in the
  online-softmax rescaling, ~1e-6 relative; 1e-5 leaves margin without hiding a masking bug
  (a wrongly visible or hidden slot moves outputs by ~1e-2 or more).
- bfloat16: every implementation upcasts to f32 inside, so two results differ by the rounding
  of (nearly) the same f32 value to bf16: at most one bf16 ulp, i.e. 2**-7 relative.
- bfloat16 with pv_in_kv_dtype=True: the softmax weights are also rounded to bf16 (relative
  error 2**-9 each) before the PV matmul, adding up to 2**-9 * max|v| absolute on top.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.hybrid_paged_attention import (
    hybrid_paged_attention,
    hybrid_paged_attention_gpu,
    hybrid_paged_attention_reference,
    hybrid_paged_attention_tpu,
)

F32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=2.0**-7, atol=1e-6)


@dataclasses.dataclass(frozen=True)
class Seq:
    q_len: int  # new tokens in this call
    tok_len: int  # tokens in token pages, new ones included
    mems: tuple[int, ...] = ()  # slot counts of the memories the sequence reads


def make_batch(
    seqs: list[Seq],
    *,
    page_size: int,
    num_kv_heads: int,
    group: int,
    head_dim: int = 16,
    dtype=jnp.float32,
    pad_tokens: int = 0,
    garbage: bool = True,
    share_first_memory: bool = False,
    mem_hole: bool = False,
    seed: int = 0,
):
    """Random pool + tables. Every slot nobody may read (unused pages, slots past a page's
    valid length) holds NaN, so any read of it shows up as NaN in the output."""
    rng = np.random.default_rng(seed)
    cdiv = lambda a, b: -(-a // b)
    mem_pages_of = [[cdiv(m, page_size) for m in s.mems] for s in seqs]
    max_mem = max([sum(p) for p in mem_pages_of] + [1]) + (1 if mem_hole else 0) + 1
    max_tok = max(cdiv(s.tok_len, page_size) for s in seqs) + 1
    num_pages = sum(sum(p) for p in mem_pages_of) + sum(cdiv(s.tok_len, page_size) for s in seqs) + 3
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k = np.full(shape, np.nan, np.float32)
    v = np.full(shape, np.nan, np.float32)
    free = iter(rng.permutation(num_pages))  # scattered page ids, as in a real pool

    def fill(n_slots):
        pages = [int(next(free)) for _ in range(cdiv(n_slots, page_size))]
        for j, p in enumerate(pages):
            n = min(page_size, n_slots - j * page_size)
            k[p, :n] = rng.standard_normal((n, num_kv_heads, head_dim))
            v[p, :n] = rng.standard_normal((n, num_kv_heads, head_dim))
        return pages

    S = len(seqs)
    # Own generator: the data must not depend on `garbage`.
    junk_rng = np.random.default_rng(seed + 10_000)
    junk = lambda shape: junk_rng.integers(-5, num_pages + 50, shape) if garbage else np.zeros(shape)
    mem_table, mem_lens = junk((S, max_mem)).astype(np.int32), np.zeros((S, max_mem), np.int32)
    tok_table = junk((S, max_tok)).astype(np.int32)
    shared = None
    for s, seq in enumerate(seqs):
        e = 0
        for i, m in enumerate(seq.mems):
            if share_first_memory and i == 0 and shared is not None and shared[0] == m:
                pages = shared[1]
            else:
                pages = fill(m)
                if i == 0:
                    shared = (m, pages)
            for j, p in enumerate(pages):
                mem_table[s, e], mem_lens[s, e] = p, min(page_size, m - j * page_size)
                e += 1
            if mem_hole and i == 0:
                e += 1  # an unused entry between two memories
        tok_pages = fill(seq.tok_len)
        tok_table[s, : len(tok_pages)] = tok_pages
    q_lens = np.array([s.q_len for s in seqs])
    num_tokens = int(q_lens.sum()) + pad_tokens
    q = rng.standard_normal((num_tokens, num_kv_heads * group, head_dim)).astype(np.float32)
    args = (
        jnp.asarray(q, dtype),
        jnp.asarray(k, dtype),
        jnp.asarray(v, dtype),
        jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
        jnp.asarray(mem_table),
        jnp.asarray(mem_lens),
        jnp.asarray(tok_table),
        jnp.asarray([s.tok_len for s in seqs], jnp.int32),
    )
    return args


def brute_force(
    q,
    k_pages,
    v_pages,
    cu_q_lens,
    mem_table,
    mem_lens,
    tok_table,
    tok_lens,
    sm_scale=None,
    soft_cap=None,
    mem_page_bias=None,
):
    """The semantics read literally, one query and one head at a time, in float64."""
    q, k_pages, v_pages = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k_pages, v_pages))
    cu_q_lens, mem_table, mem_lens, tok_table, tok_lens = map(
        np.asarray, (cu_q_lens, mem_table, mem_lens, tok_table, tok_lens)
    )
    num_tokens, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_pages.shape[1], k_pages.shape[2]
    scale = 1 / np.sqrt(head_dim) if sm_scale is None else sm_scale
    out = np.zeros_like(q)
    for s in range(len(tok_lens)):
        q_len = cu_q_lens[s + 1] - cu_q_lens[s]
        for i in range(q_len):
            row, p = cu_q_lens[s] + i, tok_lens[s] - q_len + i
            slots = [(mem_table[s, j], t) for j in range(mem_table.shape[1]) for t in range(mem_lens[s, j])]
            bias = [
                0.0 if mem_page_bias is None else float(mem_page_bias[s, j])
                for j in range(mem_table.shape[1])
                for t in range(mem_lens[s, j])
            ]
            slots += [(tok_table[s, n // page_size], n % page_size) for n in range(p + 1)]
            bias += [0.0] * (p + 1)
            for h in range(num_q_heads):
                kvh = h // (num_q_heads // num_kv_heads)
                logits = np.array([q[row, h] @ k_pages[pg, t, kvh] for pg, t in slots]) * scale
                if soft_cap is not None:
                    logits = soft_cap * np.tanh(logits / soft_cap)
                logits = logits + np.array(bias)
                w = np.exp(logits - logits.max())
                out[row, h] = (w / w.sum()) @ np.array([v_pages[pg, t, kvh] for pg, t in slots])
    return out


# ---------------------------------------------------------------------------------------------
# Cases. Axes: batch kind x memory x GQA ratio x page size (an L9 orthogonal array: every pair of
# values of these four axes occurs once) x dtype (each value meets every value of the others).
# Memory axis: "none" = no sequence has memories; "only" = a sequence's token pages hold just
# this call's new tokens (tok_len == q_len; for decode that is the 1-token token page), so
# all older context comes from memories; "both" = memories plus older tokens.


def batch_seqs(kind: str, mem: str, P: int) -> list[Seq]:
    if kind == "decode":
        specs = [(1, 1), (1, P + 1), (1, 2 * P + 3)]
    elif kind == "prefill":  # two fresh prompts and a later chunk of a chunked prefill
        specs = [(P + 2, P + 2), (3, 3), (P, 2 * P + 1)]
    else:
        specs = [(1, P + 4), (P + 1, P + 1), (1, 2), (4, P + 5)]
    mems = [(P + 3,), (5,), (2 * P, 3)]  # a partial last page, a sub-page memory, two memories
    return [Seq(q, q if mem == "only" else t, () if mem == "none" else mems[i % 3]) for i, (q, t) in enumerate(specs)]


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str
    mem: str
    group: int
    page_size: int
    dtype: str
    pad_tokens: int
    tpu_tuning: tuple  # (q_block, pages_per_block); None = the kernel's default
    gpu_tuning: tuple  # (q_block, pages_per_block, kv_splits)

    def args(self, seed: int = 0, **kw):
        return make_batch(
            batch_seqs(self.kind, self.mem, self.page_size),
            page_size=self.page_size,
            num_kv_heads=1 if self.group == 8 else 2,
            group=self.group,
            dtype=jnp.dtype(self.dtype),
            pad_tokens=self.pad_tokens,
            share_first_memory=True,
            mem_hole=self.mem == "both",
            seed=seed,
            **kw,
        )

    def __str__(self):
        return f"{self.kind}-mem_{self.mem}-G{self.group}-P{self.page_size}-{self.dtype}"


CASES = [
    Case("decode", "none", 1, 8, "float32", 0, (None, None), (None, None, None)),
    Case("decode", "only", 4, 16, "bfloat16", 1, (2, 1), (2, 1, 2)),
    Case("decode", "both", 8, 64, "float32", 2, (4, 2), (4, 1, 3)),
    Case("prefill", "none", 4, 64, "bfloat16", 2, (None, 1), (None, 1, 2)),
    Case("prefill", "only", 8, 8, "float32", 0, (2, 2), (2, 2, None)),
    Case("prefill", "both", 1, 16, "bfloat16", 1, (4, None), (4, 4, 1)),
    Case("mixed", "none", 8, 16, "bfloat16", 1, (None, 2), (None, 2, 2)),
    Case("mixed", "only", 1, 64, "float32", 2, (2, None), (2, None, 3)),
    Case("mixed", "both", 4, 8, "float32", 0, (4, 1), (4, 4, None)),
]
CASE_IDS = [str(c) for c in CASES]


def tol(dtype) -> dict:
    return BF16_TOL if jnp.dtype(dtype) == jnp.bfloat16 else F32_TOL


def f32(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


def run_tpu(args, dma_mode: str = "on_wait", **kw):
    # "on_wait" runs a DMA only when it is waited for, "eager" as soon as it starts: the two
    # extreme timings, so a read before its wait or a prefetch into the buffer in use fails.
    params = pltpu.InterpretParams(dma_execution_mode=dma_mode)
    return hybrid_paged_attention_tpu(*args, interpret=params, **kw)


def run_gpu(args, **kw):
    return hybrid_paged_attention_gpu(*args, interpret=True, **kw)


def run_impl(impl: str, args, **kw):
    if impl == "tpu":
        return run_tpu(args, **kw)
    if impl == "gpu":
        return run_gpu(args, **kw)
    return hybrid_paged_attention_reference(*args, **kw)


# ---------------------------------------------------------------------------------------------
# Semantics and kernels vs reference.


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_matches_brute_force(case):
    args = case.args()
    out = hybrid_paged_attention_reference(*args)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    np.testing.assert_allclose(f32(out), brute_force(*args), **tol(case.dtype))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_tpu_kernel_matches_reference(case):
    args = case.args()
    q_block, ppb = case.tpu_tuning
    dma_mode = "eager" if CASES.index(case) % 2 else "on_wait"
    out = run_tpu(args, dma_mode, q_block=q_block, pages_per_block=ppb)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    np.testing.assert_allclose(f32(out), f32(hybrid_paged_attention_reference(*args)), **tol(case.dtype))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gpu_kernel_matches_reference(case):
    args = case.args()
    q_block, ppb, splits = case.gpu_tuning
    out = run_gpu(args, q_block=q_block, pages_per_block=ppb, kv_splits=splits)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    np.testing.assert_allclose(f32(out), f32(hybrid_paged_attention_reference(*args)), **tol(case.dtype))


@pytest.mark.parametrize("impl", ["reference", "tpu", "gpu"])
def test_soft_cap_and_sm_scale(impl):
    # A cap of 2 with a scale of 1.0 bends most logits: a kernel ignoring either option fails.
    args = CASES[8].args(seed=3)
    out = run_impl(impl, args, sm_scale=1.0, soft_cap=2.0)
    np.testing.assert_allclose(f32(out), brute_force(*args, sm_scale=1.0, soft_cap=2.0), **F32_TOL)


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_pv_in_kv_dtype_bf16(impl):
    # Weights rounded to bf16 (2**-9 relative each) add <= 2**-9 * max|v| (~4 here) on top
    # of one output ulp.
    args = CASES[6].args(seed=4)
    out = run_impl(impl, args, pv_in_kv_dtype=True)
    np.testing.assert_allclose(f32(out), f32(hybrid_paged_attention_reference(*args)), rtol=2.0**-7, atol=4 * 2.0**-9)


# ---------------------------------------------------------------------------------------------
# Robustness: garbage tables, padding rows, dynamic lengths.


@pytest.mark.parametrize("impl", ["reference", "tpu", "gpu"])
def test_garbage_past_used_entries_does_not_change_results(impl):
    case = CASES[5]
    clean = run_impl(impl, case.args(seed=5, garbage=False))
    dirty_args = case.args(seed=5, garbage=True)
    assert not np.array_equal(np.asarray(dirty_args[4]), np.asarray(case.args(seed=5, garbage=False)[4]))
    np.testing.assert_array_equal(f32(run_impl(impl, dirty_args)), f32(clean))


@pytest.mark.parametrize("impl", ["reference", "tpu", "gpu"])
def test_padding_rows_are_zero_and_nothing_is_nan(impl):
    args = CASES[7].args(seed=6)
    n_real = int(args[3][-1])
    assert args[0].shape[0] - n_real == 2
    out = f32(run_impl(impl, args))
    assert np.isfinite(out).all()
    assert (out[n_real:] == 0).all()
    assert (np.abs(out[:n_real]).sum(axis=(1, 2)) > 0).all()


@pytest.mark.parametrize("impl", ["reference", "tpu", "gpu"])
def test_batch_slots_without_new_tokens(impl):
    # Batch slots with q_len 0 (idle or finished sequences) between and after real ones; the
    # small q_block puts them inside blocks that the kernels must walk past.
    seqs = [Seq(3, 5, (3,)), Seq(0, 0), Seq(0, 7, (9,)), Seq(2, 4), Seq(1, 9, (4,)), Seq(0, 0)]
    args = make_batch(seqs, page_size=8, num_kv_heads=2, group=4, pad_tokens=1, seed=10)
    kw = dict(q_block=4) if impl != "reference" else {}
    np.testing.assert_allclose(f32(run_impl(impl, args, **kw)), brute_force(*args), **F32_TOL)


@pytest.mark.parametrize("impl", ["reference", "tpu", "gpu"])
def test_zero_width_memory_table_means_no_memory(impl):
    args = CASES[0].args(seed=9)  # no memories: every memory entry is unused
    no_table = (*args[:4], args[4][:, :0], args[5][:, :0], *args[6:])
    # Not bitwise: the reference's reductions run over a different (padded) length.
    np.testing.assert_allclose(f32(run_impl(impl, no_table)), f32(run_impl(impl, args)), **F32_TOL)


def shrink_lengths(args):
    """Same shapes, other dynamic values: the last sequence loses two new tokens (they become
    padding rows) and every memory page loses one valid slot."""
    q, k, v, cu, mem_t, mem_l, tok_t, tok_l = args
    cu = cu.at[-1].add(-2)
    tok_l = tok_l.at[-1].add(-2)
    mem_l = jnp.maximum(mem_l - 1, 0)
    return q, k, v, cu, mem_t, mem_l, tok_t, tok_l


@pytest.mark.parametrize("impl", ["reference", "tpu", "gpu"])
def test_changed_lengths_do_not_recompile(impl):
    case = CASES[8]
    args = case.args(seed=7)
    kw = {"tpu": dict(interpret=pltpu.InterpretParams()), "gpu": dict(interpret=True)}.get(impl, {})
    fn = jax.jit(functools.partial(hybrid_paged_attention, impl=impl, **kw))
    first = fn(*args)
    args2 = shrink_lengths(args)
    second = fn(*args2)
    assert fn._cache_size() == 1
    np.testing.assert_allclose(f32(first), brute_force(*args), **F32_TOL)
    np.testing.assert_allclose(f32(second), brute_force(*args2), **F32_TOL)


# ---------------------------------------------------------------------------------------------
# Dispatcher.


def test_dispatcher_picks_by_backend_and_honours_impl(monkeypatch):
    from pallas_kernels.hybrid_paged_attention import dispatch

    calls = []
    for name in dispatch.IMPLS:
        monkeypatch.setitem(dispatch.IMPLS, name, lambda *a, _n=name, **kw: calls.append((_n, kw)))
    args = CASES[0].args()
    hybrid_paged_attention(*args)
    assert jax.default_backend() == "cpu" and calls[-1][0] == "reference"
    for backend, expected in [("tpu", "tpu"), ("gpu", "gpu"), ("cpu", "reference")]:
        monkeypatch.setattr(dispatch.jax, "default_backend", lambda b=backend: b)
        hybrid_paged_attention(*args)
        assert calls[-1][0] == expected
    for name in ["reference", "tpu", "gpu"]:
        hybrid_paged_attention(*args, impl=name, soft_cap=3.0)
        assert calls[-1] == (name, dict(sm_scale=None, soft_cap=3.0))
    hybrid_paged_attention(*args, impl="gpu", interpret=True)
    assert calls[-1] == ("gpu", dict(sm_scale=None, soft_cap=None, interpret=True))
    with pytest.raises(ValueError):
        hybrid_paged_attention(*args, impl="cuda")
    with pytest.raises(TypeError):
        hybrid_paged_attention(*args, impl="reference", interpret=True)


def test_dispatcher_names_the_argument_of_a_bad_shape():
    q, k, v, cu, mem_table, mem_lens, tok_table, tok_lens = CASES[0].args()
    S = cu.shape[0] - 1
    bad = {
        "q must be": dict(q=q[0]),
        "v_pages has shape": dict(v_pages=v[:, :, :, :8]),
        "q's head_dim 8 differs": dict(q=q[:, :, :8]),
        "heads are not a multiple": dict(q=q[:, :1]),  # 1 q head over 2 kv heads
        "cu_q_lens must be": dict(cu_q_lens=cu[:1]),
        "mem_page_table must be": dict(mem_page_table=mem_table[: S - 1] if S > 1 else mem_table[None]),
        "mem_page_lens has shape": dict(mem_page_lens=mem_lens[:, :-1]),
        "tok_page_table must be": dict(tok_page_table=jnp.concatenate([tok_table, tok_table])),
        "tok_lens must be": dict(tok_lens=tok_lens[:-1]),
    }
    names = ("q", "k_pages", "v_pages", "cu_q_lens", "mem_page_table", "mem_page_lens", "tok_page_table", "tok_lens")
    good = dict(zip(names, (q, k, v, cu, mem_table, mem_lens, tok_table, tok_lens)))
    for message, change in bad.items():
        with pytest.raises(ValueError, match=f"^hybrid_paged_attention: .*{message}"):
            hybrid_paged_attention(**{**good, **change})
    jax.jit(hybrid_paged_attention)(**good)  # shapes are static: the check also runs under jit


def test_dispatcher_default_on_cpu_is_the_reference():
    args = CASES[4].args(seed=8)
    np.testing.assert_array_equal(f32(hybrid_paged_attention(*args)), f32(hybrid_paged_attention_reference(*args)))


# ---------------------------------------------------------------------------------------------
# Lowering for the real targets, from this CPU host.


def _specs(args):
    return [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tpu_kernel_lowers_for_tpu(dtype):
    # Stops at Mosaic MLIR: Mosaic's own layout passes run in libtpu at compile time.
    args = dataclasses.replace(CASES[8], dtype=dtype).args()
    fn = functools.partial(hybrid_paged_attention_tpu, soft_cap=30.0, q_block=4, pages_per_block=2)
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*_specs(args))
    assert exported.platforms == ("tpu",)
    assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_kernel_lowers_for_cuda(dtype):
    # Lowers to Triton IR on this CPU host (PTX comes at XLA compile time on a GPU). Only the
    # stable-custom-call check is waived: Triton calls carry no serialization guarantee.
    args = dataclasses.replace(CASES[6], dtype=dtype).args()
    fn = functools.partial(hybrid_paged_attention_gpu, soft_cap=30.0, kv_splits=2)
    exported = jax.export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*_specs(args))
    assert exported.platforms == ("cuda",)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


def test_gpu_kernel_rejects_shapes_triton_cannot_tile():
    q, k, v, *rest = CASES[0].args()
    with pytest.raises(ValueError, match="head_dim"):
        hybrid_paged_attention_gpu(q[..., :12], k[..., :12], v[..., :12], *rest, interpret=True)


# ---------------------------------------------------------------------------------------------
# Per-memory-page bias (memory priors, docs/design.md section 8).


def page_bias(args, seed: int = 0) -> jax.Array:
    """A float32 bias per memory-page entry: large enough (sd 3) to reorder the softmax, NaN on
    every entry a sequence does not own, so reading one shows up as NaN in the output."""
    mem_lens = np.asarray(args[5])
    values = np.random.default_rng(seed).normal(0.0, 3.0, mem_lens.shape).astype(np.float32)
    return jnp.asarray(np.where(mem_lens > 0, values, np.nan))


BIAS_CASES = [c for c in CASES if c.mem != "none"] + [CASES[0], CASES[3]]  # with and without memories


@pytest.mark.parametrize("case", BIAS_CASES, ids=[str(c) for c in BIAS_CASES])
def test_reference_with_page_bias_matches_brute_force(case):
    args = case.args(seed=11)
    bias = page_bias(args, seed=1)
    out = f32(hybrid_paged_attention_reference(*args, mem_page_bias=bias))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, brute_force(*args, mem_page_bias=np.asarray(bias)), **tol(case.dtype))
    if case.mem != "none":  # the bias matters: without it the rows reading memories differ
        assert not np.allclose(out, f32(hybrid_paged_attention_reference(*args)), **tol(case.dtype))


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
@pytest.mark.parametrize(
    "case", [CASES[2], CASES[4], CASES[8], CASES[3]], ids=lambda c: str(c)
)  # decode, prefill, mixed with memories; prefill without
def test_kernels_with_page_bias_match_reference(impl, case):
    args = case.args(seed=12)
    bias = page_bias(args, seed=2)
    if impl == "tpu":
        out = run_tpu(args, q_block=case.tpu_tuning[0], pages_per_block=case.tpu_tuning[1], mem_page_bias=bias)
    else:
        g = case.gpu_tuning
        out = run_gpu(args, q_block=g[0], pages_per_block=g[1], kv_splits=g[2], mem_page_bias=bias)
    out = f32(out)
    assert np.isfinite(out).all()  # the NaN entries of pages nobody owns were never used
    np.testing.assert_allclose(out, f32(hybrid_paged_attention_reference(*args, mem_page_bias=bias)), **tol(case.dtype))


@pytest.mark.parametrize("impl", ["reference", "tpu", "gpu"])
def test_zero_page_bias_equals_no_bias(impl):
    args = CASES[8].args(seed=13)
    zero = jnp.zeros(args[4].shape, jnp.float32)
    np.testing.assert_array_equal(f32(run_impl(impl, args, mem_page_bias=zero)), f32(run_impl(impl, args)))


def test_dispatcher_passes_the_bias_and_names_a_misshapen_one():
    args = CASES[8].args(seed=14)
    bias = page_bias(args, seed=3)
    np.testing.assert_array_equal(
        f32(hybrid_paged_attention(*args, mem_page_bias=bias)),
        f32(hybrid_paged_attention_reference(*args, mem_page_bias=bias)),
    )
    with pytest.raises(ValueError, match="^hybrid_paged_attention: mem_page_bias must be"):
        hybrid_paged_attention(*args, mem_page_bias=bias[:, :-1])


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernels_with_page_bias_lower_for_their_targets(platform):
    # The bias rides in SMEM as float32 scalars on TPU and as a flat input on GPU.
    args = CASES[8].args()
    specs = [*_specs(args), jax.ShapeDtypeStruct(args[4].shape, jnp.float32)]
    if platform == "tpu":
        fn = lambda *a: hybrid_paged_attention_tpu(*a[:8], mem_page_bias=a[8], q_block=4, pages_per_block=2)
        exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*specs)
        assert "tpu_custom_call" in exported.mlir_module()
    else:
        fn = lambda *a: hybrid_paged_attention_gpu(*a[:8], mem_page_bias=a[8], kv_splits=2)
        exported = jax.export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*specs)
        assert "__gpu$xla.gpu.triton" in exported.mlir_module()
