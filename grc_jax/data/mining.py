"""Hard negatives for records that have fewer than N: BM25 (bm25s) or a trained grc_jax model.

A ranker returns, for each query, corpus indices best first. A record's mined negatives are its
query's (or question's) top documents, skipping its positive, its own negatives, the texts its
converter excluded (other relevant documents of the query) and, for records with an answer, any
document that contains the answer (most likely a false negative).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from grc_jax.data.formats.common import Output

Ranker = Callable[[Sequence[str], Sequence[str], int], list[list[int]]]


def bm25_ranker(queries: Sequence[str], corpus: Sequence[str], k: int) -> list[list[int]]:
    """BM25 with English stopwords; documents sharing no term with the query are never returned."""
    import bm25s
    from bm25s.tokenization import Tokenizer

    # One tokenizer for both sides: query words outside the corpus vocabulary, and stopwords, drop out.
    tokenizer = Tokenizer(stopwords="en")
    retriever = bm25s.BM25()
    retriever.index(tokenizer.tokenize(list(corpus), return_as="ids", show_progress=False), show_progress=False)
    tokens = tokenizer.tokenize(list(queries), update_vocab=False, return_as="ids", show_progress=False)
    docs, scores = retriever.retrieve(tokens, k=min(k, len(corpus)), show_progress=False)
    return [[int(d) for d, s in zip(row_docs, row_scores) if s > 0] for row_docs, row_scores in zip(docs, scores)]


def model_ranker(run: str) -> Ranker:
    """Cosine similarity of a trained run's query and document embeddings (Engine.from_pretrained)."""
    from grc_jax.inference.engine import Engine

    engine = Engine.from_pretrained(run)

    def rank(queries: Sequence[str], corpus: Sequence[str], k: int) -> list[list[int]]:
        documents = np.asarray(engine.encode_document(list(corpus)), np.float32)
        out: list[list[int]] = []
        for start in range(0, len(queries), 1024):  # bounds the [queries, corpus] similarity matrix
            q = np.asarray(engine.encode_query(list(queries[start : start + 1024])), np.float32)
            sims = q @ documents.T
            out += [np.argsort(-row, kind="stable")[:k].tolist() for row in sims]
        return out

    return rank


def mine(outputs: list[Output], corpus: Sequence[str], n: int, rank: Ranker) -> int:
    """Fills every record with a positive up to n negatives, in place; returns how many were added."""
    corpus = list(dict.fromkeys(c for c in corpus if c.strip()))
    needy = [o for o in outputs if "positive" in o.record and len(o.record.get("negatives", ())) < n]
    if not needy or not corpus:
        return 0
    margin = max(len(o.exclude) + len(o.record.get("negatives", ())) for o in needy) + 1
    ranked = rank([o.record.get("query") or o.record["question"] for o in needy], corpus, n + margin)
    added = 0
    for output, indices in zip(needy, ranked):
        record = output.record
        negatives = list(record.get("negatives", ()))
        banned = {record["positive"], *negatives, *output.exclude}
        answer = record.get("answer", "").lower()
        for i in indices:
            if len(negatives) >= n:
                break
            text = corpus[i]
            if text in banned or (answer and answer in text.lower()):
                continue
            negatives.append(text)
            banned.add(text)
            added += 1
        if negatives:
            record["negatives"] = negatives
    return added
