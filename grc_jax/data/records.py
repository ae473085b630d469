"""Reading GRC training records from JSONL files (docs/design.md section 4).

One JSON object per line, with these fields, all optional:

    query: str, reasoning: str, positive: str, negatives: list[str],
    question: str, answer: str, text: str

A record must feed at least one loss: `text` (generative); `query` + `positive`
(representative); `positive` + `question` + `answer` (compressive); `query` + `reasoning`
(generative, self-reasoning). Fields that cannot take part in any loss of their record are
errors rather than silently dropped, because they almost always mean a broken converter:
`reasoning` without `query`, `negatives` without `positive`, `question` without `answer`
(or the reverse), `question`/`answer` without `positive`, `query` with neither `positive`
nor `reasoning`, `positive` with no query and no question. A JSON `null` counts as absent.

An entry `seqio:TASK[:SPLIT]` of `files` reads a seqio Task's examples as lines (`seqio_source.py`).

A malformed line raises `ValueError("{file}:{line}: {why}")`; with `skip_malformed=True`
it is logged as a warning and counted instead. Lines are read by `grc_jax/jsonl.py`: blank lines
are ignored, a byte-order mark on line 1 is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from absl import logging

from grc_jax import jsonl
from grc_jax.errors import UserError

STRING_FIELDS = ("query", "reasoning", "positive", "question", "answer", "text")
FIELDS = ("query", "reasoning", "positive", "negatives", "question", "answer", "text")


@dataclasses.dataclass(frozen=True)
class Record:
    """One training record; `source` is "file:line", for error messages downstream."""

    source: str
    query: str | None = None
    reasoning: str | None = None
    positive: str | None = None
    negatives: tuple[str, ...] = ()
    question: str | None = None
    answer: str | None = None
    text: str | None = None


def parse_record(line: bytes | str, source: str) -> Record:
    """Parses one non-blank JSONL line; raises UserError("{source}: {why}") if malformed."""
    try:
        return _record(jsonl.parse_line(line), source)
    except (jsonl.LineError, _Malformed) as e:
        raise UserError(f"{source}: {e}") from None


def read_records(files: Sequence[str | Path] | str | Path, *, skip_malformed: bool = False) -> tuple[list[Record], int]:
    """All records of `files` in order, and how many malformed lines were skipped."""
    if isinstance(files, (str, Path)):
        files = [files]
    records: list[Record] = []
    skipped = 0
    for source, raw in _numbered_lines(files):
        try:
            records.append(parse_record(raw, source))
        except ValueError as e:
            if not skip_malformed:
                raise
            skipped += 1
            logging.warning("skipping malformed record: %s", e)
    return records, skipped


class _Malformed(Exception):
    pass


def _numbered_lines(files: Iterable[str | Path]) -> Iterator[tuple[str, bytes]]:
    # Bytes, decoded line by line, so that one bad byte makes one malformed line, not a failed file.
    from grc_jax.data import seqio_source  # it imports this module

    for file in files:
        if seqio_source.is_seqio_source(file):
            yield from seqio_source.example_lines(file)
            continue
        for number, raw in jsonl.numbered_lines(file):
            if raw.strip():
                yield f"{file}:{number}", raw


def _record(obj: dict[str, Any], source: str) -> Record:
    fields = {k: v for k, v in obj.items() if v is not None}
    for name in fields:
        if name not in FIELDS:
            raise _Malformed(_unknown_field(name))
    for name in STRING_FIELDS:
        if name in fields:
            _check_text(name, fields[name])
    if "negatives" in fields:
        negatives = fields["negatives"]
        if not isinstance(negatives, list):
            raise _Malformed(f"field 'negatives' must be a list of strings, got {jsonl.json_type(negatives)}")
        for i, negative in enumerate(negatives):
            _check_text(f"negatives[{i}]", negative)
        fields["negatives"] = tuple(negatives)
    _check_losses(fields)
    return Record(source=source, **fields)


def _unknown_field(name: str) -> str:
    close = difflib.get_close_matches(name, FIELDS, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(FIELDS)}"
    return f"unknown field '{name}' ({hint})"


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise _Malformed(f"field '{name}' must be a string, got {jsonl.json_type(value)}")
    if not value.strip():
        raise _Malformed(f"field '{name}' is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800"
        raise _Malformed(f"field '{name}' is not valid Unicode ({e.reason} at character {e.start})") from None


def _check_losses(fields: dict[str, Any]) -> None:
    if not fields:
        raise _Malformed(
            "empty record feeds no loss; give 'text', 'query'+'positive', "
            "'positive'+'question'+'answer' or 'query'+'reasoning'"
        )
    has = fields.__contains__
    dangling = [
        (has("reasoning") and not has("query"), "'reasoning' without 'query'"),
        (has("negatives") and not has("positive"), "'negatives' without 'positive'"),
        (has("question") and not has("answer"), "'question' without 'answer'"),
        (has("answer") and not has("question"), "'answer' without 'question'"),
        (
            has("question") and has("answer") and not has("positive"),
            "'question'+'answer' without 'positive' (the memory the reader reads)",
        ),
        (has("query") and not (has("positive") or has("reasoning")), "'query' without 'positive' or 'reasoning'"),
        (
            has("positive") and not (has("query") or has("question")),
            "'positive' without 'query' or 'question'+'answer'",
        ),
    ]
    for bad, what in dangling:
        if bad:
            raise _Malformed(f"{what} feeds no loss")
