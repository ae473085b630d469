"""Held-out evaluation during training, on a demo-world style directory: retrieval, memory
QA, multi-hop. (`python -m grc_jax.evaluate` is the general evaluation CLI.)

- retrieval: each held-out query against every held-out document (recall@1, recall@10, nDCG@10);
- memory QA: the answer read from memories (the right one among distractors) vs no memory,
  as exact match of greedy decoding (computed teacher-forced: greedy reproduces the answer
  exactly when the argmax at every answer position is the answer token);
- multi-hop: queries about the training world, embedded as they are vs after the model
  generates its own reasoning (self-reason-latent embedding), recall@1 over the training corpus.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grc_jax import layout, model
from grc_jax.config import ModelConfig
from grc_jax.data.builder import answer_text

NUM_DISTRACTORS = 4


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def retrieval_metrics(queries: np.ndarray, documents: np.ndarray, gold: Sequence[int]) -> dict[str, float]:
    """recall@1, recall@10 and nDCG@10 with one relevant document per query, computed by
    pytrec_eval as `python -m grc_jax.evaluate` does (equal scores are ordered by document
    index, descending, not in the gold document's favour)."""
    from grc_jax.eval.metrics import ir_metrics, rank_documents

    doc_ids = [f"{i:09d}" for i in range(len(documents))]  # trec_eval breaks ties by id: keep id order numeric
    query_ids = [str(i) for i in range(len(gold))]
    run = rank_documents(queries, documents, query_ids, doc_ids, depth=10)
    figures = ir_metrics({q: {doc_ids[int(g)]: 1} for q, g in zip(query_ids, gold)}, run, recall_ks=(1, 10))
    return {k: figures[k] for k in ("recall@1", "recall@10", "ndcg@10")}


def answer_exact_match(config: ModelConfig, params: model.Params, memories: Sequence[Sequence[Sequence[int]]],
                       readers: Sequence[tuple[list[int], list[int]]], latent_ids: Sequence[int],
                       batch_size: int = 32) -> float:
    """Fraction of (question, answer+eos) readers that greedy decoding answers exactly, each
    reader seeing its own list of memory segments (possibly none)."""
    hits = []
    for start in range(0, len(readers), batch_size):
        rows, spans = [], []
        for segs, (question, answer) in zip(memories[start:start + batch_size], readers[start:start + batch_size]):
            pieces = layout.example_pieces([list(s)[: config.max_segment_len] for s in segs], question + answer,
                                           latent_ids, config.max_segment_len)
            rows.append(pieces)
            size = sum(len(t) for _, _, t in pieces)
            spans.append((size - len(answer), size))
        length = max(sum(len(t) for _, _, t in p) for p in rows)
        packed = [layout.pack_rows([p], length)[0] for p in rows]
        tokens = np.stack([r.tokens for r in packed])
        meta = [np.stack([getattr(r, f) for r in packed]) for f in ("example", "segment", "kind")]
        predicted = np.asarray(_argmax_jit(config, params, jnp.asarray(tokens), *map(jnp.asarray, meta)))
        for row, (a, b) in enumerate(spans):
            hits.append(bool((predicted[row, a - 1:b - 1] == tokens[row, a:b]).all()))
    return float(np.mean(hits))


@functools.partial(jax.jit, static_argnums=0)
def _argmax_jit(config, params, tokens, example, segment, kind):
    out = model.forward(config, params, tokens, layout.TokenMeta(example, segment, kind))
    return jnp.argmax(out.logits[..., : config.vocab_size], axis=-1)


# The segments and readers below are laid out exactly as grc_jax.data.builder lays out training
# records: each field tokenized on its own, no special tokens added.
def document_tokens(tok: Any, text: str, max_segment_len: int) -> list[int]:
    return tok.encode(text)[:max_segment_len]


def query_tokens(tok: Any, query: str, reasoning: str | list[int] | None, eor_id: int) -> list[int]:
    """[query] or [query][reasoning][end of reasoning]; reasoning as text or generated ids."""
    if reasoning is None:
        return tok.encode(query)
    ids = tok.encode(reasoning) if isinstance(reasoning, str) else list(reasoning)
    return tok.encode(query) + ids + [eor_id]


def reader_tokens(tok: Any, question: str, answer: str, eos_id: int) -> tuple[list[int], list[int]]:
    return tok.encode(question), tok.encode(answer_text(question, answer)) + [eos_id]


def evaluate_world(config: ModelConfig, params: model.Params, setup: Any, run_config: Any) -> dict[str, float]:
    """All held-out figures for a demo-world directory (`setup` from grc_jax.train.prepare)."""
    from grc_jax.inference import Engine

    world = Path(setup.eval_dir)
    tok, b = setup.tokenizer, setup.build
    latent_ids, P = list(b.latent_ids), b.max_segment_len
    engine = Engine(config, params, tok, special_tokens=setup.special_tokens,
                    max_reason_tokens=run_config.reasoning_max_tokens)
    rng = np.random.default_rng(0)
    limit = run_config.eval_max_queries
    results: dict[str, float] = {}

    corpus = read_jsonl(world / "corpus_heldout.jsonl")
    doc_index = {d["text"]: i for i, d in enumerate(corpus)}
    docs = engine.embed_tokens([document_tokens(tok, d["text"], P) for d in corpus])
    heldout = read_jsonl(world / "heldout.jsonl")
    retrieval = [r for r in heldout if "query" in r and "positive" in r][:limit]
    queries = engine.embed_tokens([query_tokens(tok, r["query"], None, b.eor_id) for r in retrieval])
    results.update({f"retrieval/{k}": v for k, v in retrieval_metrics(
        queries, docs, [doc_index[r["positive"]] for r in retrieval]).items()})

    qa = [r for r in heldout if "question" in r and "answer" in r and "positive" in r][:limit]
    memories = []
    texts_of_corpus = {d["text"] for d in corpus}
    for r in qa:
        distractors = [d for d in r.get("negatives", []) if d != r["positive"]][:NUM_DISTRACTORS]
        # A small held-out split may have fewer other documents than NUM_DISTRACTORS.
        wanted = min(NUM_DISTRACTORS, len((texts_of_corpus | set(distractors)) - {r["positive"]}))
        while len(distractors) < wanted:  # top up with other held-out documents
            extra = corpus[int(rng.integers(len(corpus)))]["text"]
            if extra != r["positive"] and extra not in distractors:
                distractors.append(extra)
        texts = distractors + [r["positive"]]
        rng.shuffle(texts)
        memories.append([document_tokens(tok, t, P) for t in texts])
    readers = [reader_tokens(tok, r["question"], r["answer"], b.eos_id) for r in qa]
    results["memory_qa/exact_match"] = answer_exact_match(config, params, memories, readers, latent_ids)
    results["memory_qa/exact_match_no_memory"] = answer_exact_match(config, params, [[] for _ in qa], readers, latent_ids)

    train_corpus = read_jsonl(world / "corpus_train.jsonl")
    train_index = {d["text"]: i for i, d in enumerate(train_corpus)}
    train_docs = engine.embed_tokens([document_tokens(tok, d["text"], P) for d in train_corpus])
    hops = [r for r in read_jsonl(world / "multihop_eval.jsonl") if r.get("positive") in train_index][:limit]
    gold = [train_index[r["positive"]] for r in hops]
    plain = engine.embed_tokens([query_tokens(tok, r["query"], None, b.eor_id) for r in hops])
    reasoned, _ = engine.embed_with_reasoning_tokens([tok.encode(r["query"]) for r in hops])
    oracle = engine.embed_tokens([query_tokens(tok, r["query"], r["reasoning"], b.eor_id) for r in hops])
    for name, emb in (("plain", plain), ("self_reasoning", reasoned), ("gold_reasoning", oracle)):
        results[f"multihop/recall@1_{name}"] = retrieval_metrics(emb, train_docs, gold)["recall@1"]
    return results
