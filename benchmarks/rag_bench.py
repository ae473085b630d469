"""RAG over 16 latent memories against the same 16 documents (512 tokens each) in context:
time to first token and the K/V the generator reads, on the CPU.

    python benchmarks/rag_bench.py
    python benchmarks/rag_bench.py --no-write

One random GRC model (K = 16 meta latent tokens, P = 512, so a memory is 32x smaller than its
document). The 16 documents are compressed once, offline (timed, reported apart). Then one
question (16 tokens) is answered three ways, each timed from the request to its first token:
- memories: the question is a READER over the 16 memories' pages (256 latent slots), through
  `grc_jax.inference.Decoder`; "cold" copies the memories from the bank into the page pool
  first, "warm" finds them resident;
- full documents, transformers: the same weights exported with grc_jax.hf.save_pretrained, one
  `LlamaForCausalLM` forward (SDPA) over the 8208 tokens and an argmax: the efficient baseline;
- full documents, ours (--ours-full, off by default): the 8192 document tokens then the question
  as one prompt, chunked prefill through the same decoder. The XLA reference attention gathers
  every query row's pages, so on a CPU this takes minutes (one run, compile included).
Retrieval for the memory path (embed the question, search the 16 embeddings) is timed too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from grc_jax import hf, layout, model  # noqa: E402
from grc_jax.config import ModelConfig  # noqa: E402
from grc_jax.inference import MemoryBank  # noqa: E402
from grc_jax.inference.decoder import Decoder  # noqa: E402
from grc_jax.inference.engine import segment_pass  # noqa: E402

from decode_bench import machine, write_section  # noqa: E402

CONFIG = ModelConfig(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=688,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    num_latents=16,
    max_segment_len=512,
)
NUM_DOCS, DOC_LEN, QUESTION_LEN = 16, 512, 16


def segment_rows(segments: np.ndarray) -> tuple[jax.Array, ...]:
    """[text][latents] rows for segment_pass, laid out as Engine lays them out."""
    rows = layout.segment_rows(
        segments.tolist(), CONFIG.latent_token_ids, CONFIG.max_segment_len, segments.shape[1] + CONFIG.num_latents
    )
    return tuple(jnp.asarray(a) for a in (rows.tokens, rows.example, rows.kind, rows.latent_index))


def first_token(
    decoder: Decoder, prompt: list[int], memories: list | None = None, source=None, extra: int = 0
) -> tuple[float, int]:
    """Seconds from the request to its first generated token, and the token."""
    start = time.perf_counter()
    batch = decoder.start([prompt], decoder.settings(1), memories=memories, memory_source=source, extra=extra)
    try:
        decoder.advance(batch, 1)
        token = int(jax.device_get(batch.state.tokens[0, len(prompt)]))
    finally:
        decoder.finish(batch)
    return time.perf_counter() - start, token


def kv_bytes(slots: int) -> int:
    c = CONFIG
    return 2 * c.num_layers * slots * c.num_kv_heads * c.head_dim * jnp.dtype(c.dtype).itemsize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions of the fast (memory, HF) paths")
    parser.add_argument("--ours-full", action="store_true", help="also time our own full-document prefill (minutes)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import torch
    import transformers

    rng = np.random.default_rng(0)
    docs = rng.integers(3, CONFIG.vocab_size, (NUM_DOCS, DOC_LEN))
    question = rng.integers(3, CONFIG.vocab_size, QUESTION_LEN).tolist()
    params = jax.jit(model.init_params, static_argnums=0)(CONFIG, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x, params)

    # offline: one pass per document gives its memory and its embedding
    segment_pass(CONFIG, params, *segment_rows(docs[:4]))[2].block_until_ready()  # compile
    start = time.perf_counter()
    parts = [
        jax.device_get(segment_pass(CONFIG, params, *segment_rows(docs[i : i + 4]))) for i in range(0, NUM_DOCS, 4)
    ]
    compress_s = time.perf_counter() - start
    keys, values, embeddings = (np.concatenate([p[j] for p in parts]) for j in range(3))
    bank = MemoryBank.for_model(CONFIG)
    ids = bank.add(keys, values, embeddings)

    # retrieval: embed the question ([question][latents]) and search
    q_rows = segment_rows(np.asarray([question]))
    segment_pass(CONFIG, params, *q_rows)[2].block_until_ready()
    retrieval = []
    for _ in range(args.reps):
        start = time.perf_counter()
        q = np.asarray(segment_pass(CONFIG, params, *q_rows)[2])
        found, _ = bank.search(q, top_k=NUM_DOCS)
        retrieval.append(time.perf_counter() - start)
    assert sorted(found[0].tolist()) == sorted(ids)

    full = docs.reshape(-1).tolist() + question
    pages = -(-(len(full) + 1) // 16) + NUM_DOCS + 8
    decoder = Decoder(CONFIG, params, num_pages=pages, page_size=16, prefill_chunk=512)
    mems = [[bank.pool_key(i) for i in ids]]
    source = lambda keys: bank.kv([k[1] for k in keys])

    def evict():
        for key in mems[0]:
            decoder.allocator.evict_memory(key)

    first_token(decoder, question, mems, source)  # compile
    cold, warm = [], []
    for _ in range(args.reps):
        evict()
        cold.append(first_token(decoder, question, mems, source)[0])
        warm.append(first_token(decoder, question, mems, source)[0])

    full_s = first_token(decoder, full)[0] if args.ours_full else None

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(CONFIG, params, tmp)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ids_full = torch.tensor([full])
    with torch.no_grad():
        hf_model(torch.tensor([question])).logits[0, -1].argmax()
        hf_full = []
        for _ in range(max(1, args.reps // 2)):
            start = time.perf_counter()
            hf_model(ids_full).logits[0, -1, : CONFIG.vocab_size].argmax()
            hf_full.append(time.perf_counter() - start)

    mem_slots = NUM_DOCS * CONFIG.num_latents
    ctx_mem, ctx_full = kv_bytes(mem_slots), kv_bytes(NUM_DOCS * DOC_LEN)
    req_mem, req_full = kv_bytes(mem_slots + QUESTION_LEN), kv_bytes(len(full))
    med = statistics.median
    results = {
        "memories, warm (ours)": med(warm),
        "memories, cold (ours)": med(cold),
        "full documents (transformers)": med(hf_full),
    }
    if full_s is not None:
        results["full documents (ours)"] = full_s
    for name, seconds in results.items():
        print(f"{name:32s} TTFT {seconds * 1e3:10.1f} ms", flush=True)
    print(
        f"context K/V: memories {ctx_mem / 2**20:.2f} MiB, documents {ctx_full / 2**20:.2f} MiB "
        f"({ctx_full / ctx_mem:.1f}x); compress 16 docs {compress_s:.2f} s; retrieval {med(retrieval) * 1e3:.1f} ms"
    )
    if args.no_write:
        return

    c = CONFIG
    lines = [
        f"Command: `python benchmarks/rag_bench.py --reps {args.reps}{' --ours-full' if full_s else ''}`",
        "",
        f"Machine: {machine()}.",
        "",
        f"Model: random GRC Llama, {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads / "
        f"{c.num_kv_heads} KV heads x {c.head_dim}, float32, K = {c.num_latents} latents, P = {c.max_segment_len}. "
        f"{NUM_DOCS} documents of {DOC_LEN} random tokens, a {QUESTION_LEN}-token question. TTFT = from the "
        "request to its first generated token (page admission, memory copy when cold, prefill, first step). "
        f"Medians of {args.reps} runs for the memory paths, {max(1, args.reps // 2)} for transformers"
        f"{', one run (compile included) for our own full-document prefill' if full_s else ''}. The machine is "
        "shared with other jobs; all figures come from one process, back to back.",
        "",
        "| generator reads | context K/V | request K/V (with the question) | TTFT | TTFT vs memories (warm) |",
        "|---|---|---|---|---|",
        f"| 16 memories, resident in the pool (ours) | {ctx_mem / 2**20:.2f} MiB | {req_mem / 2**20:.2f} MiB | "
        f"{med(warm) * 1e3:.1f} ms | 1x |",
        f"| 16 memories, copied from the bank first (ours) | {ctx_mem / 2**20:.2f} MiB | {req_mem / 2**20:.2f} MiB | "
        f"{med(cold) * 1e3:.1f} ms | {med(cold) / med(warm):.1f}x |",
        *(
            [
                f"| 16 full documents, chunked prefill (ours, XLA reference attention) | {ctx_full / 2**20:.2f} MiB | "
                f"{req_full / 2**20:.2f} MiB | {full_s * 1e3:.0f} ms | {full_s / med(warm):.0f}x |"
            ]
            if full_s
            else []
        ),
        f"| 16 full documents, one forward (transformers, SDPA) | {ctx_full / 2**20:.2f} MiB | "
        f"{req_full / 2**20:.2f} MiB | {med(hf_full) * 1e3:.0f} ms | {med(hf_full) / med(warm):.0f}x |",
        "",
        f"- K/V: the context the generator reads is {ctx_full / ctx_mem:.0f}x smaller with memories (target 32x at "
        f"K=16: {'met' if ctx_full / ctx_mem >= 32 else '**missed**'}); with the question's own K/V, "
        f"{req_full / req_mem:.1f}x.",
        f"- TTFT: memories (cold) vs full documents in transformers: {med(hf_full) / med(cold):.0f}x lower "
        f"(target >= 10x: {'met' if med(hf_full) / med(cold) >= 10 else '**missed**'}; cold path, efficient "
        "baseline)" + (f"; vs our own full-document prefill {full_s / med(cold):.0f}x." if full_s else "."),
        f"- Offline, not in TTFT: compressing the 16 documents (one pass each, memory and embedding together) "
        f"took {compress_s:.2f} s; retrieval (embed the question, search 16 embeddings) takes "
        f"{med(retrieval) * 1e3:.1f} ms per question.",
    ]
    write_section("RAG: 16 memories vs 16 documents in context (rag_bench.py)", "\n".join(lines))


if __name__ == "__main__":
    main()
