"""MS MARCO style triplets -> {query, positive, negatives}.

Inputs: the MS MARCO TSV (query<TAB>positive<TAB>negative, or query<TAB>positive pairs), and the
sentence-transformers layouts as JSONL or Parquet: columns query (or anchor), positive, and
negative, negative_1 .. negative_N, or a negatives list (or none: pairs). Consecutive rows with
the same query and positive become one record with their negatives in order, as the TSV repeats a
(query, positive) once per negative.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from grc_jax.data.formats.common import (
    Context,
    FormatError,
    Output,
    Skip,
    best_chunk,
    first_chunk,
    read_jsonl,
    require_file,
)

_COLUMNS = "a 'query' (or 'anchor') and a 'positive' column, and optionally 'negative', 'negative_1'.. or 'negatives'"
_TSV = "query<TAB>positive[<TAB>negative]"
_NEGATIVE_N = re.compile(r"negative_(\d+)$")


def convert(path: Path, ctx: Context) -> Iterator[Output | Skip]:
    current: tuple[str, str] | None = None
    negatives: list[str] = []
    where = ""
    for row_where, query, positive, row_negatives in _rows(path):
        if (query, positive) != current:
            if current is not None:
                yield _record(current, negatives, where, ctx)
            current, negatives, where = (query, positive), [], row_where
        negatives += [n for n in row_negatives if n not in negatives]
    if current is not None:
        yield _record(current, negatives, where, ctx)


def _record(pair: tuple[str, str], negatives: list[str], where: str, ctx: Context) -> Output | Skip:
    query, positive = pair
    if not query.strip() or not positive.strip():
        return Skip("empty query or positive", where)
    record: dict[str, Any] = {"query": query.strip(), "positive": best_chunk(ctx.chunker, query, positive)}
    negatives = [first_chunk(ctx.chunker, n) for n in negatives if n.strip() and n != positive]
    if negatives:
        record["negatives"] = negatives[: ctx.negatives]
    return Output(record, where)


def _rows(path: Path) -> Iterator[tuple[str, str, str, list[str]]]:
    require_file(path, f"a TSV ({_TSV}), JSONL or Parquet file of triplets")
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        yield from _tsv(path)
    elif suffix in (".jsonl", ".json"):
        for where, obj in read_jsonl(path, f"a JSON object with {_COLUMNS}"):
            yield (where, *_columns(obj, where))
    elif suffix == ".parquet":
        yield from _parquet(path)
    else:
        raise FormatError(str(path), "unknown extension; expected .tsv, .jsonl or .parquet")


def _tsv(path: Path) -> Iterator[tuple[str, str, str, list[str]]]:
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            cells = line.rstrip("\r\n").split("\t")
            if len(cells) not in (2, 3):
                raise FormatError(f"{path}:{number}", f"{len(cells)} tab-separated columns; expected {_TSV}")
            yield f"{path}:{number}", cells[0], cells[1], cells[2:]


def _parquet(path: Path) -> Iterator[tuple[str, str, str, list[str]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FormatError(str(path), "reading Parquet needs pyarrow: pip install 'grc_jax[data]'") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and others for a file that is not Parquet
        raise FormatError(str(path), f"not a Parquet file ({e})") from None
    row = 0
    for batch in table.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            row += 1
            where = f"{path}:row {row}"
            yield (where, *_columns(obj, where))


def _columns(obj: dict[str, Any], where: str) -> tuple[str, str, list[str]]:
    query = obj.get("query", obj.get("anchor"))
    if not isinstance(query, str) or not isinstance(obj.get("positive"), str):
        missing = "query" if not isinstance(query, str) else "positive"
        raise FormatError(
            where, f"no text column '{missing}' (columns: {', '.join(obj) or 'none'}); expected {_COLUMNS}"
        )
    negatives: list[Any] = []
    if "negatives" in obj:
        negatives = obj["negatives"] if isinstance(obj["negatives"], list) else [obj["negatives"]]
    if "negative" in obj:
        negatives.append(obj["negative"])
    numbered = sorted((int(m.group(1)), k) for k in obj if (m := _NEGATIVE_N.match(k)))
    negatives += [obj[k] for _, k in numbered]
    for n in negatives:
        if n is not None and not isinstance(n, str):
            raise FormatError(where, f"a negative is a {type(n).__name__}; expected text")
    return query, obj["positive"], [n for n in negatives if n is not None]
