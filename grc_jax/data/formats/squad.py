"""SQuAD v1.1 / v2.0 JSON -> {question, answer, positive, negatives}.

The positive is the question's paragraph, or, when the paragraph is longer than P tokens, its
chunk that holds the (first) answer; an answer that straddles two chunks gets a P-token window
around it instead. The negatives are other paragraphs of the same article (their chunk sharing
most words with the question), in article order. Unanswerable questions (v2.0's is_impossible,
or no answer) are skipped and counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from grc_jax.data.formats.common import Context, Output, Skip, best_chunk, field, read_json

_WHAT = (
    'SQuAD JSON {"data": [{"title", "paragraphs": [{"context": str, "qas": [{"question": str, '
    '"answers": [{"text": str, "answer_start": int}]}]}]}]}'
)


def convert(path: Path, ctx: Context) -> Iterator[Output | Skip]:
    data = field(read_json(path, _WHAT), "data", str(path), list, _WHAT)
    for i, article in enumerate(data):
        at = f"{path}:data[{i}]"
        paragraphs = field(article, "paragraphs", at, list, _WHAT)
        contexts = [field(p, "context", f"{at}.paragraphs[{j}]", str, _WHAT) for j, p in enumerate(paragraphs)]
        for j, paragraph in enumerate(paragraphs):
            for k, qa in enumerate(field(paragraph, "qas", f"{at}.paragraphs[{j}]", list, _WHAT)):
                where = f"{at}.paragraphs[{j}].qas[{k}]"
                question = field(qa, "question", where, str, _WHAT)
                answers = field(qa, "answers", where, list, _WHAT) if "answers" in qa else []
                if qa.get("is_impossible") or not answers:
                    yield Skip("unanswerable", where)
                    continue
                answer = field(answers[0], "text", f"{where}.answers[0]", str, _WHAT)
                start = field(answers[0], "answer_start", f"{where}.answers[0]", int, _WHAT)
                yield _record(question, answer, start, contexts, j, where, ctx)


def _record(
    question: str, answer: str, start: int, contexts: list[str], j: int, where: str, ctx: Context
) -> Output | Skip:
    context = contexts[j]
    if not question.strip() or not answer.strip():
        return Skip("empty question or answer", where)
    if context[start : start + len(answer)] != answer:
        found = context.find(answer)  # a few answer_start values are off; the text decides
        if found < 0:
            return Skip("answer not in its paragraph", where)
        start = found
    span = _holding(ctx, context, start, start + len(answer))
    if span is None:
        return Skip("answer longer than a chunk", where)
    negatives = [best_chunk(ctx.chunker, question, c) for m, c in enumerate(contexts) if m != j and c.strip()]
    record = {"question": question.strip(), "answer": answer.strip(), "positive": context[span[0] : span[1]]}
    if negatives:
        record["negatives"] = negatives[: ctx.negatives]
    return Output(record, where)


def _holding(ctx: Context, context: str, start: int, end: int) -> tuple[int, int] | None:
    """The span of the chunk that holds [start, end), or a window around it."""
    for a, b in ctx.chunker.spans(context):
        if a <= start and end <= b:
            return a, b
    return ctx.chunker.window(context, start, end)
