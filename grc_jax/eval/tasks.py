"""The evaluation tasks over an `Engine`: retrieval, memory QA, generation, latency, perplexity.

Each returns (flat metrics, details): metrics are `name -> float` (the report's headline
figures, also written to TensorBoard); details hold counts, settings and sample outputs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import types
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from grc_jax.errors import UserError
from grc_jax.eval import metrics
from grc_jax.eval import perplexity as ppl
from grc_jax.eval.data import BeirDataset, QARecord
from grc_jax.eval.distractors import with_distractors
from grc_jax.inference.engine import Engine
from grc_jax.inference.memory_bank import MemoryBank
from grc_jax.inference.pages import page_bytes

QUERY_MODES = ("plain", "reason")
QA_MODES = ("memory", "full_text", "no_context")
NUM_SAMPLES = 5  # predictions kept in the report per task, to eyeball


@dataclasses.dataclass(frozen=True)
class Options:
    batch_size: int = 32
    progress: bool = True
    query_modes: tuple[str, ...] = QUERY_MODES
    ignore_identical_ids: bool = False
    num_distractors: int = 4
    qa_max_new_tokens: int = 32
    gen_max_new_tokens: int = 256
    gen_template: str = "{question}"
    latency_samples: int = 4
    latency_tokens: int = 32
    seed: int = 0
    ppl_window: int = 512
    ppl_max_tokens: int | None = None


def _batches(items: Sequence[Any], size: int, desc: str, unit: str, enabled: bool):
    with tqdm(total=len(items), desc=desc, unit=unit, disable=not enabled, leave=False) as bar:
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            yield chunk
            bar.update(len(chunk))


def _embed(fn: Callable[..., np.ndarray], texts: Sequence[str], options: Options, desc: str, unit: str) -> np.ndarray:
    # Chunks of several engine batches: a progress step each, without losing batching.
    out = [
        fn(list(chunk), batch_size=options.batch_size)
        for chunk in _batches(texts, 4 * options.batch_size, desc, unit, options.progress)
    ]
    return np.concatenate(out)


# --- retrieval -----------------------------------------------------------------------------


def retrieval(engine: Engine, data: BeirDataset, options: Options) -> tuple[dict[str, float], dict[str, Any]]:
    """nDCG@10, recall@1/10/100 and MRR (pytrec_eval) with plain and self-reasoned queries.
    Documents longer than max_segment_len tokens are embedded from their first segment."""
    docs = _embed(engine.encode_document, data.doc_texts, options, f"{data.name}: documents", "doc")
    out, details = (
        {},
        {"documents": len(data.doc_ids), "queries": len(data.query_ids), "queries_with_exclusions": len(data.excluded)},
    )
    for mode in options.query_modes:
        fn = (
            (lambda texts, batch_size: engine.encode_query(texts, batch_size=batch_size, reason=True))
            if mode == "reason"
            else engine.encode_query
        )
        queries = _embed(fn, data.query_texts, options, f"{data.name}: {mode} queries", "query")
        run = metrics.rank_documents(
            queries,
            docs,
            data.query_ids,
            data.doc_ids,
            data.excluded,
            ignore_identical_ids=options.ignore_identical_ids,
        )
        for name, value in metrics.ir_metrics(data.qrels, run).items():
            out[f"retrieval/{data.name}/{mode}/{name}"] = value
        details[f"{mode}_top10_sample"] = {
            q: sorted(run[q], key=run[q].get, reverse=True)[:10] for q in data.query_ids[:NUM_SAMPLES]
        }
    return out, details


# --- memory QA ------------------------------------------------------------------------------


def qa_contexts(records: Sequence[QARecord], num_distractors: int, seed: int) -> list[list[str]]:
    """Each question's documents: its positive and `num_distractors` distractors (its negatives,
    topped up with other records' documents), shuffled (`distractors.with_distractors`)."""
    rng = np.random.default_rng(seed)
    pool = sorted({t for r in records for t in (r.positive, *r.negatives) if t})
    return [with_distractors(r.positive, r.negatives, pool, num_distractors, rng) for r in records]


def full_text_prompt(documents: Sequence[str], question: str) -> str:
    return "\n\n".join([*documents, question])


def memory_qa(engine: Engine, records: Sequence[QARecord], options: Options) -> tuple[dict[str, float], dict[str, Any]]:
    """Answers from memories (positive + distractors, compressed), from the same documents as
    text in the prompt, and from no context: SQuAD exact match and token F1 for each."""
    contexts = qa_contexts(records, options.num_distractors, options.seed)
    unique = list(dict.fromkeys(t for c in contexts for t in c))
    saved = engine.bank
    engine.bank = MemoryBank.for_model(engine.config)  # the user's bank is neither read nor changed
    try:
        memory_of: dict[str, list[int]] = {}
        for chunk in _batches(unique, options.batch_size, "memory QA: compress", "doc", options.progress):
            memory_of.update(zip(chunk, engine.compress(list(chunk))))
        prompts = {
            "memory": [r.question for r in records],
            "full_text": [full_text_prompt(c, r.question) for r, c in zip(records, contexts)],
            "no_context": [r.question for r in records],
        }
        rows = {
            "memory": [[m for t in c for m in memory_of[t]] for c in contexts],
            "full_text": None,
            "no_context": None,
        }
        answers = {}
        for mode in QA_MODES:
            got = []
            indices = list(range(len(records)))
            for chunk in _batches(indices, options.batch_size, f"memory QA: {mode}", "question", options.progress):
                memories = [rows[mode][i] for i in chunk] if rows[mode] is not None else None
                got.extend(
                    engine.generate(
                        [prompts[mode][i] for i in chunk], memories=memories, max_new_tokens=options.qa_max_new_tokens
                    )
                )
            answers[mode] = got
    finally:
        engine.bank = saved
    out = {}
    for mode in QA_MODES:
        out[f"memory_qa/{mode}/exact_match"] = float(
            np.mean([metrics.exact_match(a, r.answers) for a, r in zip(answers[mode], records)])
        )
        out[f"memory_qa/{mode}/f1"] = float(
            np.mean([metrics.token_f1(a, r.answers) for a, r in zip(answers[mode], records)])
        )
    doc_tokens = sum(len(engine.tokenizer.encode(t)) for t in unique)
    slots = sum(len(memory_of[t]) for t in unique) * engine.config.num_latents
    out["memory_qa/compression_ratio"] = doc_tokens / slots
    full_tokens = [len(engine.tokenizer.encode(p)) for p in prompts["full_text"]]
    details = {
        "questions": len(records),
        "documents": len(unique),
        "document_tokens": doc_tokens,
        "memory_slots": slots,
        "memories_per_question": float(np.mean([len(r) for r in rows["memory"]])),
        "full_text_prompt_tokens_mean": float(np.mean(full_tokens)),
        "samples": [
            {
                "line": r.line,
                "question": r.question,
                "answers": list(r.answers),
                **{mode: answers[mode][i] for mode in QA_MODES},
            }
            for i, r in enumerate(records[:NUM_SAMPLES])
        ],
    }
    return out, details


# --- generation ------------------------------------------------------------------------------


def generation(
    engine: Engine, name: str, records: Sequence[QARecord], options: Options
) -> tuple[dict[str, float], dict[str, Any]]:
    """Exact match of the final number (GSM8K: after '####', else the last number)."""
    prompts = [options.gen_template.replace("{question}", r.question) for r in records]  # other braces stay as written
    outputs = []
    for chunk in _batches(prompts, options.batch_size, f"generation: {name}", "question", options.progress):
        outputs.extend(engine.generate(list(chunk), max_new_tokens=options.gen_max_new_tokens))
    scores = [max(metrics.gsm8k_match(o, a) for a in r.answers) for o, r in zip(outputs, records)]
    extracted = [metrics.extract_gsm8k_answer(o) is not None for o in outputs]
    out = {
        f"generation/{name}/exact_match": float(np.mean(scores)),
        f"generation/{name}/answer_found": float(np.mean(extracted)),
    }
    details = {
        "questions": len(records),
        "template": options.gen_template,
        "samples": [
            {
                "line": r.line,
                "question": r.question,
                "answers": list(r.answers),
                "output": o,
                "extracted": metrics.extract_gsm8k_answer(o),
            }
            for r, o in zip(records[:NUM_SAMPLES], outputs)
        ],
    }
    return out, details


# --- perplexity -------------------------------------------------------------------------------


def perplexity(
    engine: Engine, name: str, documents: Sequence[str], options: Options
) -> tuple[dict[str, float], dict[str, Any]]:
    """Perplexity of the plain language model (no latents, no memories) on the text, read as
    non-overlapping windows of `options.ppl_window` tokens (grc_jax/eval/perplexity.py)."""
    # the engine's encoding of user text: special-token strings typed in it stay text
    encoder = types.SimpleNamespace(encode=engine.tokenize)
    windows = ppl.text_windows(encoder, documents, options.ppl_window, options.ppl_max_tokens)
    if not windows:
        raise UserError(f"perplexity: {name}: the text is shorter than 2 tokens; nothing to score")
    scores = ppl.perplexity(engine.config, engine.params, windows, batch_size=options.batch_size)
    out = {
        f"perplexity/{name}/perplexity": scores["perplexity"],
        f"perplexity/{name}/nll_per_token": scores["nll_per_token"],
    }
    details = {
        "documents": len(documents),
        "window": options.ppl_window,
        "max_tokens": options.ppl_max_tokens,
        "tokens_scored": scores["tokens_scored"],
        "windows": scores["windows"],
    }
    return out, details


# --- latency ----------------------------------------------------------------------------------

TIMING_REPEATS = 3


def _warm_timed(fn: Callable[[], Any]) -> float:
    """Median seconds of `fn` over TIMING_REPEATS calls, after one untimed call that compiles
    for these shapes. Every Engine call returns host values, so the device work is done."""
    fn()
    seconds = []
    for _ in range(TIMING_REPEATS):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def latency(engine: Engine, records: Sequence[QARecord], options: Options) -> tuple[dict[str, float], dict[str, Any]]:
    """Per request (batch 1, greedy, no stop token so every request makes `latency_tokens`):
    time to first token, decode tokens/s and the KV bytes the request attends to, for each
    generation mode; and per-text time of embedding, self-reasoned embedding and compression.
    Each figure is a median over requests of per-request medians over repeats, after an
    untimed call of the same shapes, so compilation is excluded; memory pages are then
    resident in the pool, as for a bank that serves repeated reads."""
    records = list(records[: options.latency_samples])
    with_docs = all(r.positive for r in records)
    contexts = qa_contexts(records, options.num_distractors, options.seed) if with_docs else [[] for _ in records]
    slot_bytes = page_bytes(engine.config, 1)  # K and V of one token, all layers, compute dtype
    K = engine.config.num_latents
    saved = engine.bank
    engine.bank = MemoryBank.for_model(engine.config)
    out: dict[str, float] = {}
    details: dict[str, Any] = {"requests": len(records), "new_tokens": options.latency_tokens, "slot_bytes": slot_bytes}
    try:
        documents = list(dict.fromkeys(t for c in contexts for t in c))
        if documents:
            seconds = [_warm_timed(lambda d=d: engine.compress(d)) for d in documents]
            out["latency/compress/ms_per_text"] = 1e3 * statistics.median(seconds)
            memory_of = {d: engine.compress(d)[0] for d in documents}
        questions = [r.question for r in records]
        out["latency/embed/ms_per_text"] = 1e3 * statistics.median(
            [_warm_timed(lambda q=q: engine.encode_query(q)) for q in questions]
        )
        if engine.eor_id is not None and "reason" in options.query_modes:
            out["latency/embed_reason/ms_per_text"] = 1e3 * statistics.median(
                [_warm_timed(lambda q=q: engine.encode_query(q, reason=True)) for q in questions]
            )
        modes: dict[str, list[tuple[str, list[int] | None]]] = {"no_context": [(q, None) for q in questions]}
        if documents:
            modes["memory"] = [(q, [m for t in c for m in memory_of[t]]) for q, c in zip(questions, contexts)]
            modes["full_text"] = [(full_text_prompt(c, q), None) for q, c in zip(questions, contexts)]
        n = options.latency_tokens
        for mode, requests in tqdm(
            list(modes.items()), desc="latency", unit="mode", disable=not options.progress, leave=False
        ):
            ttft, total, context_bytes = [], [], []
            for prompt, memories in requests:
                # stop_tokens=[]: no early stop, so every timed request makes exactly n tokens
                first = lambda: engine.generate(prompt, memories=memories, max_new_tokens=1, stop_tokens=[])
                whole = lambda: engine.generate(prompt, memories=memories, max_new_tokens=n, stop_tokens=[])
                ttft.append(_warm_timed(first))
                total.append(_warm_timed(whole))
                slots = len(engine.tokenizer.encode(prompt)) + K * len(memories or [])
                context_bytes.append(slots * slot_bytes)
            first_s, total_s = statistics.median(ttft), statistics.median(total)
            out[f"latency/{mode}/ttft_ms"] = 1e3 * first_s
            out[f"latency/{mode}/tokens_per_s"] = n / total_s
            # Decode speed is the time the n - 1 tokens after the first add; on a tiny model that
            # difference can drown in timer noise, and a figure from noise is worse than none.
            if n > 1 and total_s > first_s:
                out[f"latency/{mode}/decode_tokens_per_s"] = (n - 1) / (total_s - first_s)
            out[f"latency/{mode}/kv_bytes_context"] = float(statistics.mean(context_bytes))
            out[f"latency/{mode}/kv_bytes_total"] = float(statistics.mean(context_bytes)) + n * slot_bytes
    finally:
        engine.bank = saved
    return out, details
