"""BEIR directories: corpus.jsonl, queries.jsonl, qrels/<split>.tsv -> {query, positive, negatives}.

One record per (query, relevant document) pair of the split's qrels (score > 0). A relevant
document longer than P gives its chunk that shares the most words with the query; documents
judged with score 0 are the record's first negatives (hard negatives), the rest are mined from
the whole chunked corpus, never from the query's relevant documents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from grc_jax.data.formats.common import (
    Context,
    FormatError,
    Output,
    Skip,
    best_chunk,
    field,
    first_chunk,
    read_jsonl,
    require_file,
    titled,
)

_CORPUS = 'a corpus.jsonl line {"_id": str, "title": str, "text": str}'
_QUERIES = 'a queries.jsonl line {"_id": str, "text": str}'
_QRELS = "a qrels line 'query-id<TAB>corpus-id<TAB>score' with an integer score"


def convert(path: Path, ctx: Context) -> Iterator[Output | Skip]:
    if not path.is_dir():
        raise FormatError(
            str(path), "not a directory; expected a BEIR directory with corpus.jsonl, queries.jsonl, qrels/"
        )
    corpus = {
        _id(obj, where, _CORPUS): titled(
            _text(obj, "title", where, _CORPUS, optional=True), _text(obj, "text", where, _CORPUS)
        )
        for where, obj in read_jsonl(path / "corpus.jsonl", _CORPUS)
    }
    queries = {
        _id(obj, where, _QUERIES): _text(obj, "text", where, _QUERIES)
        for where, obj in read_jsonl(path / "queries.jsonl", _QUERIES)
    }
    chunks = {doc: ctx.chunker.chunks(text) or [text] for doc, text in corpus.items()}
    ctx.corpus = [c for doc_chunks in chunks.values() for c in doc_chunks]
    judged: dict[str, dict[str, tuple[int, str]]] = {}
    for where, query, doc, score in _qrels(_split_file(path, ctx.split)):
        if query not in queries:
            raise FormatError(where, f"query id {query!r} is not in queries.jsonl")
        if doc not in corpus:
            raise FormatError(where, f"corpus id {doc!r} is not in corpus.jsonl")
        judged.setdefault(query, {})[doc] = (score, where)
    for query, docs in judged.items():
        relevant = [d for d, (score, _) in docs.items() if score > 0]
        if not relevant:
            yield Skip("no relevant document in qrels", next(iter(docs.values()))[1])
            continue
        negatives = [first_chunk(ctx.chunker, corpus[d]) for d, (score, _) in docs.items() if score <= 0]
        exclude = tuple(c for d in relevant for c in chunks[d])
        for doc in relevant:
            record = {"query": queries[query], "positive": best_chunk(ctx.chunker, queries[query], corpus[doc])}
            if negatives:
                record["negatives"] = negatives[: ctx.negatives]
            yield Output(record, docs[doc][1], exclude)


def _split_file(path: Path, split: str | None) -> Path:
    qrels = path / "qrels"
    available = sorted(p.stem for p in qrels.glob("*.tsv"))
    if split is None:
        if "train" in available or len(available) != 1:
            split = "train"
        else:
            split = available[0]
    return require_file(
        qrels / f"{split}.tsv",
        f"the qrels of split {split!r} (have: {', '.join(available) or 'none'}; choose one with --split)",
    )


def _qrels(path: Path) -> Iterator[tuple[str, str, str, int]]:
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            cells = line.rstrip("\r\n").split("\t")
            if number == 1 and len(cells) == 3 and not cells[2].strip().lstrip("-").isdigit():
                continue  # the header row
            if len(cells) != 3:
                raise FormatError(where, f"{len(cells)} tab-separated columns; expected {_QRELS}")
            try:
                score = int(cells[2])
            except ValueError:
                raise FormatError(where, f"score {cells[2]!r}; expected {_QRELS}") from None
            yield where, cells[0].strip(), cells[1].strip(), score


def _id(obj: dict, where: str, what: str) -> str:
    return str(field(obj, "_id", where, (str, int), what))


def _text(obj: dict, key: str, where: str, what: str, optional: bool = False) -> str:
    if optional and obj.get(key) is None:
        return ""
    return field(obj, key, where, str, what)
