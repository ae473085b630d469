"""Metrics: IR figures through pytrec_eval (the trec_eval code BEIR and BRIGHT use), SQuAD
answer normalisation, exact match, token F1, and GSM8K-style number extraction.

Kept free of model code so the training-time evaluation (grc_jax/eval/world.py) can import it.
"""

from __future__ import annotations

import collections
import decimal
import re
import string
from typing import Iterable, Mapping, Sequence

import numpy as np
import pytrec_eval

RECALL_KS = (1, 10, 100)
NDCG_K = 10
# BRIGHT keeps each query's top 1000 documents; the trec_eval figures only look that deep.
RUN_DEPTH = 1000

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]


def ir_metrics(qrels: Qrels, run: Run, recall_ks: Sequence[int] = RECALL_KS, ndcg_k: int = NDCG_K) -> dict[str, float]:
    """Means over the queries of `qrels` of nDCG@ndcg_k, recall@k and MRR (trec_eval's
    recip_rank over the whole run), computed by pytrec_eval.

    trec_eval conventions hold: graded relevance with linear gain (rel / log2(rank + 1)), a
    document is relevant for recall and MRR when its relevance is >= 1, and equal scores are
    ordered by document id, descending. A query of `qrels` that the run has nothing for counts
    as 0 on every figure (pytrec_eval would silently leave it out of the mean).
    """
    if not qrels:
        raise ValueError("no queries to evaluate: qrels is empty")
    measures = {f"ndcg_cut.{ndcg_k}", "recall." + ",".join(str(k) for k in recall_ks), "recip_rank"}
    evaluator = pytrec_eval.RelevanceEvaluator(
        {q: {d: int(r) for d, r in docs.items()} for q, docs in qrels.items()}, measures
    )
    # pytrec_eval wants str ids and Python floats; queries with an empty ranking are left out.
    cleaned = {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items() if q in qrels and docs}
    per_query = evaluator.evaluate(cleaned) if cleaned else {}
    names = {
        f"ndcg@{ndcg_k}": f"ndcg_cut_{ndcg_k}",
        **{f"recall@{k}": f"recall_{k}" for k in recall_ks},
        "mrr": "recip_rank",
    }
    return {name: float(np.mean([per_query.get(q, {}).get(key, 0.0) for q in qrels])) for name, key in names.items()}


def rank_documents(
    query_embeddings: np.ndarray,
    doc_embeddings: np.ndarray,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    excluded: Mapping[str, Iterable[str]] | None = None,
    depth: int = RUN_DEPTH,
    ignore_identical_ids: bool = False,
    chunk: int = 256,
) -> dict[str, dict[str, float]]:
    """Each query's top `depth` documents by dot product (cosine for GRC's unit embeddings),
    and any tied with the last of them, as a pytrec_eval run. Documents in `excluded[query_id]` (BRIGHT) and, with
    `ignore_identical_ids` (BEIR's option), the document whose id is the query's, are never
    ranked."""
    query_embeddings = np.asarray(query_embeddings, np.float32)
    doc_embeddings = np.asarray(doc_embeddings, np.float32)
    if len(query_embeddings) != len(query_ids) or len(doc_embeddings) != len(doc_ids):
        raise ValueError(
            f"{len(query_embeddings)} query embeddings for {len(query_ids)} ids, "
            f"{len(doc_embeddings)} document embeddings for {len(doc_ids)} ids"
        )
    position = {d: i for i, d in enumerate(doc_ids)}
    excluded = excluded or {}
    run: dict[str, dict[str, float]] = {}
    for start in range(0, len(query_ids), chunk):  # bounds the [queries, documents] score matrix
        scores = query_embeddings[start : start + chunk] @ doc_embeddings.T
        for row, qid in enumerate(query_ids[start : start + chunk]):
            s = scores[row]
            drop = [position[d] for d in excluded.get(qid, ()) if d in position]
            if ignore_identical_ids and qid in position:
                drop.append(position[qid])
            if drop:
                s = s.copy()
                s[drop] = -np.inf
            keep = min(depth, len(s) - len(set(drop)))
            if keep <= 0:
                run[qid] = {}
                continue
            if keep < len(s):
                # Every document tied with the last one kept stays in: trec_eval then orders the
                # ties by id, so the cut never decides between equal scores.
                cutoff = s[np.argpartition(-s, keep - 1)[keep - 1]]
                top = np.flatnonzero(s >= cutoff)
            else:
                top = np.arange(len(s))
            run[qid] = {doc_ids[i]: float(s[i]) for i in top if np.isfinite(s[i])}
    return run


# --- answers ---------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    golds = [golds] if isinstance(golds, str) else list(golds)
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def token_f1(prediction: str, golds: str | Sequence[str]) -> float:
    """SQuAD token F1 over normalised words, the best over the gold answers."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize_answer(gold).split()
        if not pred or not ref:
            best = max(best, float(pred == ref))
            continue
        common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
        if common:
            precision, recall = common / len(pred), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# A sign only right before the number ("- 18" is a dash, not -18), and no number inside a word.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\$\s?)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def _clean_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5'; None when `text` is not a number."""
    text = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = decimal.Decimal(text)
    except decimal.InvalidOperation:
        return None
    # Decimal keeps large integers exact; 'f' keeps 1200 from becoming 1.2E+3.
    return format(value.normalize(), "f")


def extract_gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K-style output: the number after the first '####' if there is
    one (a base model may go on to invent another question and its answer), else the last number
    in the text; commas and '$' dropped ('$1,200.00' -> '1200'). None when the text has no number."""
    if "####" in text:
        tail = text.split("####", 1)[1]
        found = _NUMBER.findall(tail)
        if found:
            return _clean_number(found[0])
    found = _NUMBER.findall(text)
    return _clean_number(found[-1]) if found else None


def gsm8k_match(prediction: str, gold: str) -> float:
    """1.0 when both final answers are the same number; with no number in the gold answer,
    SQuAD exact match of the whole texts."""
    target = extract_gsm8k_answer(gold)
    if target is None:
        return exact_match(prediction, gold)
    return float(extract_gsm8k_answer(prediction) == target)
