"""Held-out evaluation during training, on a demo-world style directory: retrieval, memory
QA, multi-hop. (`python -m grc_jax.evaluate` is the general evaluation CLI.)

- retrieval: each held-out query against every held-out document (recall@1, recall@10, nDCG@10);
- memory QA: the answer read from memories (the right one among distractors) vs no memory,
  as exact match of greedy decoding (computed teacher-forced: greedy reproduces the answer
  exactly when the argmax at every answer position is the answer token); the right memory
  alone, among 1 and 4 look-alikes (the record's hard negatives) and among 1 and 4 random
  held-out documents;
- RAG end to end: the question searches every held-out memory, the reader reads the top 1 and
  the top 4;
- with memory priors (`train.memory_prior`, docs/design.md section 8), every reader with memories
  reads them under the prior of its question's embedding, as a run trained with them does;
- multi-hop: queries about the training world, embedded as they are vs after the model
  generates its own reasoning (self-reason-latent embedding), recall@1 over the training corpus.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grc_jax import layout, model, priors
from grc_jax.config import ModelConfig
from grc_jax.data.builder import answer_text
from grc_jax.eval.data import load_jsonl
from grc_jax.eval.distractors import with_distractors

NUM_DISTRACTORS = 4


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


def answer_exact_match(
    config: ModelConfig,
    params: model.Params,
    memories: Sequence[Sequence[Sequence[int]]],
    readers: Sequence[tuple[list[int], list[int]]],
    latent_ids: Sequence[int],
    batch_size: int = 32,
    memory_priors: Sequence[Sequence[float]] | None = None,
) -> float:
    """Fraction of (question, answer+eos) readers that greedy decoding answers exactly, each
    reader seeing its own list of memory segments (possibly none). memory_priors: per reader,
    one log-prior per memory segment, added to the reader's logits on that memory's keys."""
    hits = []
    for start in range(0, len(readers), batch_size):
        builders, spans = [], []
        chunk_priors = None if memory_priors is None else memory_priors[start : start + batch_size]
        for segs, (question, answer) in zip(memories[start : start + batch_size], readers[start : start + batch_size]):
            builder = layout.RowBuilder(latent_ids, config.max_segment_len)
            builder.new_example()  # one example per row: its segments are slots 0.. in storage order
            for segment in segs:
                builder.add_segment(list(segment)[: config.max_segment_len])
            answer_at = builder.add_reader(question + answer) + len(question)
            builders.append(builder)
            spans.append((answer_at, answer_at + len(answer)))
        length = max(b.length for b in builders)
        packed = [b.finish(length) for b in builders]
        tokens = np.stack([r.tokens for r in packed])
        meta = [np.stack([getattr(r, f) for r in packed]) for f in ("example", "segment", "kind")]
        if chunk_priors is None:
            predicted = np.asarray(_argmax_jit(config, params, jnp.asarray(tokens), *map(jnp.asarray, meta)))
        else:
            prior = np.zeros((len(packed), max([len(p) for p in chunk_priors] + [1])), np.float32)
            for row, values in enumerate(chunk_priors):
                prior[row, : len(values)] = values
            bias = priors.latent_key_bias(jnp.asarray(prior), layout.TokenMeta(*map(jnp.asarray, meta)))
            predicted = np.asarray(
                _argmax_prior_jit(config, params, jnp.asarray(tokens), *map(jnp.asarray, meta), bias)
            )
        for row, (a, b) in enumerate(spans):
            hits.append(bool((predicted[row, a - 1 : b - 1] == tokens[row, a:b]).all()))
    return float(np.mean(hits))


@functools.partial(jax.jit, static_argnums=0)
def _argmax_jit(config, params, tokens, example, segment, kind):
    out = model.forward(config, params, tokens, layout.TokenMeta(example, segment, kind))
    return jnp.argmax(out.logits[..., : config.vocab_size], axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _argmax_prior_jit(config, params, tokens, example, segment, kind, memory_bias):
    out = model.forward(config, params, tokens, layout.TokenMeta(example, segment, kind), memory_bias=memory_bias)
    return jnp.argmax(out.logits[..., : config.vocab_size], axis=-1)


def prior_values(question: np.ndarray, memories: np.ndarray, temperature: float) -> list[float]:
    """log_softmax(cos / temperature) of unit memory embeddings [m, E] for one question [E]."""
    if not len(memories):
        return []
    return np.asarray(priors.memory_prior(question, memories, temperature)).tolist()


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


def evaluate_world(
    config: ModelConfig, params: model.Params, setup: Any, run_config: Any, memory_prior: bool | None = None
) -> dict[str, float]:
    """All held-out figures for a demo-world directory (`setup` from grc_jax.train.prepare).
    memory_prior: read memories under priors (None: as the run trained, `train.memory_prior`)."""
    from grc_jax.inference import Engine

    world = Path(setup.eval_dir)
    tok, b = setup.tokenizer, setup.build
    P = b.max_segment_len
    engine = Engine(
        config, params, tok, special_tokens=setup.special_tokens, max_reason_tokens=run_config.reasoning_max_tokens
    )
    rng = np.random.default_rng(0)
    limit = run_config.eval_max_queries
    results: dict[str, float] = {}

    corpus = load_jsonl(world / "corpus_heldout.jsonl")
    doc_index = {d["text"]: i for i, d in enumerate(corpus)}
    docs = engine.embed_tokens([document_tokens(tok, d["text"], P) for d in corpus])
    heldout = load_jsonl(world / "heldout.jsonl")
    retrieval = [r for r in heldout if "query" in r and "positive" in r][:limit]
    queries = engine.embed_tokens([query_tokens(tok, r["query"], None, b.eor_id) for r in retrieval])
    results.update(
        {
            f"retrieval/{k}": v
            for k, v in retrieval_metrics(queries, docs, [doc_index[r["positive"]] for r in retrieval]).items()
        }
    )

    use_prior = bool(run_config.train.memory_prior) if memory_prior is None else memory_prior
    results.update(
        memory_qa_figures(engine, heldout, corpus, docs, limit, use_prior, run_config.train.prior_temperature, rng)
    )

    train_corpus = load_jsonl(world / "corpus_train.jsonl")
    train_index = {d["text"]: i for i, d in enumerate(train_corpus)}
    train_docs = engine.embed_tokens([document_tokens(tok, d["text"], P) for d in train_corpus])
    hops = [r for r in load_jsonl(world / "multihop_eval.jsonl") if r.get("positive") in train_index][:limit]
    gold = [train_index[r["positive"]] for r in hops]
    plain = engine.embed_tokens([query_tokens(tok, r["query"], None, b.eor_id) for r in hops])
    reasoned, _ = engine.embed_with_reasoning_tokens([tok.encode(r["query"]) for r in hops])
    oracle = engine.embed_tokens([query_tokens(tok, r["query"], r["reasoning"], b.eor_id) for r in hops])
    for name, emb in (("plain", plain), ("self_reasoning", reasoned), ("gold_reasoning", oracle)):
        results[f"multihop/recall@1_{name}"] = retrieval_metrics(emb, train_docs, gold)["recall@1"]
    return results


def memory_qa_figures(
    engine: Any,
    heldout: Sequence[dict[str, Any]],
    corpus: Sequence[dict[str, Any]],
    docs: np.ndarray,
    limit: int,
    use_prior: bool,
    prior_temperature: float,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Memory QA exact match (4 look-alikes, none, the right memory alone, 1 look-alike, 1 and 4
    random distractors) and RAG over the held-out corpus (top 1, top 4), reading under priors
    when `use_prior`. docs: the corpus's embeddings."""
    config, params, tok = engine.config, engine.params, engine.tokenizer
    latent_ids, P, tau = list(engine.latent_ids), config.max_segment_len, prior_temperature
    results: dict[str, float] = {}
    qa = [r for r in heldout if "question" in r and "answer" in r and "positive" in r][:limit]
    readers = [reader_tokens(tok, r["question"], r["answer"], engine.eos_id) for r in qa]
    corpus_texts = [d["text"] for d in corpus]
    questions = engine.embed_tokens([q[:P] for q, _ in readers]) if qa else None

    cache = dict(zip(corpus_texts, docs))

    def embedding_of(texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            cache.update(zip(missing, engine.embed_tokens([document_tokens(tok, t, P) for t in missing])))
        return np.stack([cache[t] for t in texts]) if texts else docs[:0]

    def exact_match(texts: Sequence[Sequence[str]], doc_embeddings: Sequence[np.ndarray] | None = None) -> float:
        """Exact match with each question's documents as memories (under priors if on)."""
        segs = [[document_tokens(tok, t, P) for t in row] for row in texts]
        values = None
        if use_prior:
            if doc_embeddings is None:
                doc_embeddings = [embedding_of(row) for row in texts]
            values = [prior_values(q, e, tau) for q, e in zip(questions, doc_embeddings)]
        return answer_exact_match(config, params, segs, readers, latent_ids, memory_priors=values)

    # The first figure draws from `rng` exactly as it always has: its value is comparable across runs.
    def contexts(num: int, lookalike: bool) -> list[list[str]]:
        return [with_distractors(r["positive"], r.get("negatives", []), corpus_texts, num, rng, lookalike) for r in qa]

    contexts_4 = contexts(NUM_DISTRACTORS, True)
    results["memory_qa/exact_match"] = exact_match(contexts_4)
    results["memory_qa/exact_match_no_memory"] = answer_exact_match(
        config, params, [[] for _ in qa], readers, latent_ids
    )
    results["memory_qa/exact_match_alone"] = exact_match([[r["positive"]] for r in qa])
    for num, lookalike in ((1, True), (1, False), (NUM_DISTRACTORS, False)):
        name = f"memory_qa/exact_match_{'lookalike' if lookalike else 'random'}{num}"
        results[name] = exact_match(contexts(num, lookalike))
    if qa:  # RAG: the question searches all held-out memories; the reader reads the top k
        scores = questions @ docs.T
        order = np.argsort(-scores, axis=1, kind="stable")
        for k in (1, NUM_DISTRACTORS):
            top = order[:, :k]
            results[f"rag/exact_match_top{k}"] = exact_match(
                [[corpus_texts[i] for i in row] for row in top], [docs[row] for row in top]
            )
        results["rag/question_recall@1"] = float(
            np.mean([corpus_texts[order[i, 0]] == r["positive"] for i, r in enumerate(qa)])
        )

    return results
