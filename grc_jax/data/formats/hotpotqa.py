"""HotpotQA distractor-setting JSON -> {query, reasoning, positive, negatives, question, answer}.

Each question has two gold paragraphs (the titles of its supporting facts) and eight distractor
paragraphs. GRC records have one positive, so:

- when the two gold paragraphs together fit in P tokens, they are joined (in the order of the
  supporting facts, each "title\\nsentences") into one positive, and the question gives one record
  whose reader sees both hops, so every answer (bridge, comparison, yes/no) is answerable;
- otherwise the question gives one record per gold paragraph. Both have the question as query
  and the reasoning; only the paragraph whose text holds the answer gets question+answer (a
  reader must not learn to answer from a memory that lacks the answer), and a yes/no answer,
  found in neither, gives none.

The query is the question; the reasoning is the supporting-fact sentences in order (a gold
reasoning trace), dropped with a note when query + reasoning exceed P tokens. The negatives are
the distractor paragraphs, never the other gold paragraph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from grc_jax.data.formats.common import Context, FormatError, Output, Skip, best_chunk, field, read_json_list, titled

_WHAT = (
    'HotpotQA JSON: a list of {"question": str, "answer": str, "supporting_facts": [[title, sentence index]], '
    '"context": [[title, [sentences]]]}'
)


def convert(path: Path, ctx: Context) -> Iterator[Output | Skip]:
    for where, example in read_json_list(path, _WHAT):
        yield from _records(example, where, ctx)


def _records(example: Any, where: str, ctx: Context) -> Iterator[Output | Skip]:
    question = field(example, "question", where, str, _WHAT).strip()
    answer = field(example, "answer", where, str, _WHAT).strip()
    paragraphs: dict[str, list[str]] = {}
    for j, item in enumerate(field(example, "context", where, list, _WHAT)):
        at = f"{where}.context[{j}]"
        title = field(item, 0, at, str, "[title, [sentences]]")
        sentences = field(item, 1, at, list, "[title, [sentences]]")
        if not all(isinstance(s, str) for s in sentences):
            raise FormatError(f"{at}[1]", f"sentences must be strings; expected {_WHAT}")
        paragraphs[title] = sentences
    gold: list[str] = []
    facts: list[str] = []
    for j, fact in enumerate(field(example, "supporting_facts", where, list, _WHAT)):
        at = f"{where}.supporting_facts[{j}]"
        title = field(fact, 0, at, str, "[title, sentence index]")
        index = field(fact, 1, at, int, "[title, sentence index]")
        if title not in paragraphs:
            raise FormatError(at, f"title {title!r} is not in the example's context")
        if title not in gold:
            gold.append(title)
        if 0 <= index < len(paragraphs[title]):
            facts.append(paragraphs[title][index].strip())
        else:
            ctx.notes["supporting fact past its paragraph's end (left out of the reasoning)"] += 1
    if not question or not answer:
        yield Skip("empty question or answer", where)
        return
    if not gold:
        yield Skip("no supporting facts", where)
        return
    texts = {t: titled(t, " ".join(s.strip() for s in paragraphs[t])) for t in gold}
    negatives = [
        best_chunk(ctx.chunker, question, titled(t, " ".join(s.strip() for s in sents)))
        for t, sents in paragraphs.items()
        if t not in gold and sents
    ]
    base: dict[str, Any] = {"query": question}
    reasoning = " ".join(f for f in facts if f)
    if reasoning:
        if ctx.chunker.count(question) + ctx.chunker.count(reasoning) + 1 <= ctx.chunker.max_len:
            base["reasoning"] = reasoning
        else:
            ctx.notes["query + reasoning longer than P tokens (reasoning dropped)"] += 1
    if negatives:
        base["negatives"] = negatives[: ctx.negatives]
    joined = "\n\n".join(texts[t] for t in gold)
    if ctx.chunker.count(joined) <= ctx.chunker.max_len:
        # Each gold paragraph alone may be another question's positive or distractor: never mine it here.
        yield Output(
            {**base, "positive": joined, "question": question, "answer": answer}, where, exclude=tuple(texts.values())
        )
        return
    for hop, title in enumerate(gold):
        record = {**base, "positive": best_chunk(ctx.chunker, reasoning or question, texts[title])}
        if answer.lower() in record["positive"].lower():
            record.update(question=question, answer=answer)
        yield Output(
            record, f"{where} (gold paragraph {hop + 1}: {title})", exclude=tuple(texts[t] for t in gold if t != title)
        )
