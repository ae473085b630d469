"""Evaluation inputs, read strictly: every problem is reported as `file:line: what is wrong`.

BEIR layout (https://github.com/beir-cellar/beir), one directory per dataset:

- `corpus.jsonl`: `{"_id": str, "title": str (optional), "text": str}`; a document's text is
  `title + " " + text` when it has a title (BEIR's sentence-transformers convention);
- `queries.jsonl`: `{"_id": str, "text": str, "excluded_ids": [str] (optional)}`;
  `excluded_ids` names the documents that must never be ranked for that query (BRIGHT's
  per-query exclusions; BRIGHT's "N/A" placeholder is ignored, as its runner does);
- `qrels/<split>.tsv`: tab-separated `query-id corpus-id score` with that header line; only the
  queries it names are evaluated.

Perplexity text (`load_texts`): a plain UTF-8 text file is one document; a `.jsonl` file holds one
document per line in its `text` field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

from grc_jax import jsonl

BRIGHT_NO_EXCLUSION = "N/A"


class InputError(ValueError):
    """Bad evaluation input; the message starts with `file:line:` (or `file:` for the whole file)."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {message}" if line is not None else f"{path}: {message}")


def need_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, f"missing {what}" if not path.exists() else f"{what} is not a file")
    return path


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for every line of a UTF-8 file (a byte-order mark allowed)."""
    for number, raw in jsonl.numbered_lines(path):
        try:
            yield number, jsonl.decode_line(raw)
        except jsonl.LineError as e:
            raise InputError(path, number, str(e)) from None


def read_jsonl(path: str | Path, what: str = "JSONL file") -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line (`grc_jax.jsonl`'s reading)."""
    return jsonl.read(need_file(path, what), error=InputError)


def load_jsonl(path: str | Path, what: str = "JSONL file") -> list[dict[str, Any]]:
    """Every object of a JSONL file, read by `read_jsonl` (a bad line is named `file:line`)."""
    return [record for _, record in read_jsonl(path, what)]


def _string(
    record: dict[str, Any],
    key: str,
    path: Path,
    number: int,
    *,
    required: bool = True,
    nonempty: bool = True,
    what: str = "",
) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            raise InputError(path, number, f"{what or 'record'} has no {key!r} field")
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key == "_id":
        value = str(value)  # some BEIR exports write numeric ids
    if not isinstance(value, str):
        raise InputError(path, number, f"{key!r} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise InputError(path, number, f"{what or 'record'} has an empty {key!r}")
    return value


@dataclasses.dataclass
class BeirDataset:
    name: str
    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]  # the evaluated queries: those in the qrels, in qrels order
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    excluded: dict[str, list[str]]


def load_beir(directory: str | Path, split: str = "test") -> BeirDataset:
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, None, "missing BEIR dataset directory")
    corpus_path = need_file(directory / "corpus.jsonl", "corpus file")
    queries_path = need_file(directory / "queries.jsonl", "queries file")
    qrels_path = need_file(directory / "qrels" / f"{split}.tsv", f"qrels file for split {split!r}")

    doc_ids, doc_texts, doc_line = [], [], {}
    for number, record in read_jsonl(corpus_path, "corpus file"):
        doc_id = _string(record, "_id", corpus_path, number, what="document")
        if doc_id in doc_line:
            raise InputError(corpus_path, number, f"document id {doc_id!r} repeats line {doc_line[doc_id]}")
        title = _string(record, "title", corpus_path, number, required=False, nonempty=False) or ""
        text = _string(record, "text", corpus_path, number, nonempty=False, what=f"document {doc_id!r}")
        full = f"{title.strip()} {text.strip()}".strip()
        if not full:
            raise InputError(corpus_path, number, f"document {doc_id!r} has an empty title and text")
        doc_line[doc_id] = number
        doc_ids.append(doc_id)
        doc_texts.append(full)
    if not doc_ids:
        raise InputError(corpus_path, None, "the corpus has no documents")

    queries, query_line, excluded = {}, {}, {}
    for number, record in read_jsonl(queries_path, "queries file"):
        qid = _string(record, "_id", queries_path, number, what="query")
        if qid in query_line:
            raise InputError(queries_path, number, f"query id {qid!r} repeats line {query_line[qid]}")
        queries[qid] = _string(record, "text", queries_path, number, what=f"query {qid!r}")
        query_line[qid] = number
        ids = record.get("excluded_ids")
        if ids is not None:
            if not isinstance(ids, list) or not all(isinstance(d, str) for d in ids):
                raise InputError(queries_path, number, "'excluded_ids' must be a list of document id strings")
            # Ids outside the corpus are kept out of the way, not errors: BRIGHT lists ids of its
            # long-document corpus in the short-document setting too.
            excluded[qid] = sorted({d for d in ids if d != BRIGHT_NO_EXCLUSION})

    qrels: dict[str, dict[str, int]] = {}
    qrels_line: dict[tuple[str, str], int] = {}
    for number, line in read_lines(qrels_path):
        if not line.strip():
            continue
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != 3:
            fields = line.split()
        if number == 1 and fields[:2] == ["query-id", "corpus-id"]:
            continue
        if len(fields) != 3:
            raise InputError(
                qrels_path, number, f"expected 3 tab-separated fields (query-id corpus-id score), got {len(fields)}"
            )
        qid, doc_id, score = fields
        try:
            relevance = int(score)
        except ValueError:
            raise InputError(qrels_path, number, f"score {score!r} is not an integer") from None
        if qid not in queries:
            raise InputError(qrels_path, number, f"query-id {qid!r} is not in {queries_path.name}")
        if doc_id not in doc_line:
            raise InputError(qrels_path, number, f"corpus-id {doc_id!r} is not in {corpus_path.name}")
        if relevance > 0 and doc_id in excluded.get(qid, ()):
            raise InputError(
                qrels_path,
                number,
                f"corpus-id {doc_id!r} is relevant to query {qid!r}, but "
                f"{queries_path.name}:{query_line[qid]} excludes it",
            )
        if (qid, doc_id) in qrels_line and qrels[qid][doc_id] != relevance:  # an identical repeat is harmless
            raise InputError(
                qrels_path,
                number,
                f"query {qid!r} and corpus-id {doc_id!r} are judged "
                f"{qrels[qid][doc_id]} at line {qrels_line[qid, doc_id]} and "
                f"{relevance} here",
            )
        qrels_line[qid, doc_id] = number
        qrels.setdefault(qid, {})[doc_id] = relevance
    if not qrels:
        raise InputError(qrels_path, None, "no relevance judgements")
    query_ids = list(qrels)
    return BeirDataset(
        name=directory.name,
        doc_ids=doc_ids,
        doc_texts=doc_texts,
        query_ids=query_ids,
        query_texts=[queries[q] for q in query_ids],
        qrels=qrels,
        excluded={q: excluded[q] for q in query_ids if excluded.get(q)},
    )


@dataclasses.dataclass(frozen=True)
class QARecord:
    line: int
    question: str
    answers: tuple[str, ...]
    positive: str | None
    negatives: tuple[str, ...]


def _answers(record: dict[str, Any], path: Path, number: int) -> tuple[str, ...]:
    answer = record.get("answer")
    answers = [answer] if isinstance(answer, str) else answer
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise InputError(path, number, "'answer' must be a non-empty string or a list of them")
    return tuple(answers)


def load_qa(path: str | Path, *, need_documents: bool, limit: int | None = None) -> list[QARecord]:
    """Records with a `question` (others, e.g. the retrieval records of a demo world's
    heldout.jsonl, are skipped). With `need_documents`, each must have a `positive` document;
    `negatives` (optional) are its distractors."""
    path = need_file(path, "QA file")
    out = []
    for number, record in read_jsonl(path, "QA file"):
        if "question" not in record:
            continue
        question = _string(record, "question", path, number)
        answers = _answers(record, path, number)
        positive = _string(record, "positive", path, number, required=need_documents, what="QA record")
        negatives = record.get("negatives", [])
        if not isinstance(negatives, list) or not all(isinstance(d, str) and d.strip() for d in negatives):
            raise InputError(path, number, "'negatives' must be a list of non-empty document strings")
        out.append(QARecord(number, question, answers, positive, tuple(negatives)))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise InputError(path, None, "no records with a 'question'")
    return out


def load_texts(path: str | Path) -> list[str]:
    """The documents of a perplexity text file: a `.jsonl` file's `text` fields (one document a
    line), or a plain UTF-8 text file as one document. Empty text is an error."""
    path = need_file(path, "text file")
    if path.suffix.lower() == ".jsonl":
        texts = [_string(record, "text", path, number) for number, record in read_jsonl(path, "text file")]
        if not texts:
            raise InputError(path, None, "no records with a 'text'")
        return texts
    text = "".join(line for _, line in read_lines(path))
    if not text.strip():
        raise InputError(path, None, "the text file is empty")
    return [text]
