"""Natural Questions in the DPR JSON layout -> {query, positive, negatives, question, answer}.

A list of {"question", "answers": [...], "positive_ctxs", "negative_ctxs", "hard_negative_ctxs"},
each passage {"title", "text"}. The positive is the first positive passage (its chunk holding an
answer when it is longer than P); the negatives are the hard negatives, then the other negatives.
The question and its first answer found in the positive give the compressive fields; when no
answer is in the positive, the record keeps only query, positive and negatives (noted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from grc_jax.data.formats.common import (
    Context,
    FormatError,
    Output,
    Skip,
    best_chunk,
    field,
    first_chunk,
    read_json_list,
    titled,
)

_WHAT = (
    'DPR JSON: a list of {"question": str, "answers": [str], "positive_ctxs": [{"title", "text"}], '
    '"hard_negative_ctxs": [...], "negative_ctxs": [...]}'
)


def convert(path: Path, ctx: Context) -> Iterator[Output | Skip]:
    for where, example in read_json_list(path, _WHAT):
        yield _record(example, where, ctx)


def _passages(example: Any, key: str, where: str) -> list[str]:
    if key not in example:
        return []
    out = []
    for j, passage in enumerate(field(example, key, where, list, _WHAT)):
        at = f"{where}.{key}[{j}]"
        title = passage.get("title") if isinstance(passage, dict) else None
        out.append(titled(title if isinstance(title, str) else None, field(passage, "text", at, str, _WHAT)))
    return out


def _record(example: Any, where: str, ctx: Context) -> Output | Skip:
    question = field(example, "question", where, str, _WHAT).strip()
    answers = field(example, "answers", where, list, _WHAT)
    if not all(isinstance(a, str) for a in answers):
        raise FormatError(f"{where}.answers", f"answers must be strings; expected {_WHAT}")
    field(example, "positive_ctxs", where, list, _WHAT)
    positives = _passages(example, "positive_ctxs", where)
    if not question:
        return Skip("empty question", where)
    if not positives:
        return Skip("no positive passage", where)
    text = positives[0]
    answer = next((a.strip() for a in answers if a.strip() and a.strip().lower() in text.lower()), None)
    if answer is None:
        positive = best_chunk(ctx.chunker, question, text)
        ctx.notes["no answer in the positive passage (record without question/answer)"] += 1
    else:
        positive = next((c for c in ctx.chunker.chunks(text) if answer.lower() in c.lower()), None)
        if positive is None:
            start = text.lower().find(answer.lower())
            span = ctx.chunker.window(text, start, start + len(answer))
            positive = text[span[0] : span[1]] if span else best_chunk(ctx.chunker, question, text)
    negatives = [
        first_chunk(ctx.chunker, n)
        for n in _passages(example, "hard_negative_ctxs", where) + _passages(example, "negative_ctxs", where)
    ]
    negatives = [n for n in dict.fromkeys(negatives) if n != positive]
    record: dict[str, Any] = {"query": question, "positive": positive}
    if negatives:
        record["negatives"] = negatives[: ctx.negatives]
    if answer is not None and answer.lower() in positive.lower():
        record.update(question=question, answer=answer)
    return Output(record, where, exclude=tuple(positives[1:]))
