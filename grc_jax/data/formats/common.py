"""What every converter shares: the error for input that is not in the format asked for, the
items converters yield, and readers that say where in a file a problem is."""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from grc_jax import jsonl
from grc_jax.data.chunking import Chunker


class FormatError(ValueError):
    """Input not in the format asked for: `where` is "file:line" or "file:key path"."""

    def __init__(self, where: str, expected: str):
        super().__init__(f"{where}: {expected}")
        self.where = where
        self.expected = expected


@dataclasses.dataclass(frozen=True)
class Output:
    """One GRC record (the fields of `records.FIELDS`) and where in the input it comes from."""

    record: dict[str, Any]
    source: str
    # For mining: texts that must not be mined as this record's negatives (other relevant
    # documents of the same query), beyond the positive itself.
    exclude: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Skip:
    """An input example that gives no record, and why (a short fixed reason, for counting)."""

    reason: str
    source: str


@dataclasses.dataclass
class Context:
    """What a converter needs besides its input."""

    chunker: Chunker
    negatives: int  # at most this many negatives per record
    text_field: str = "text"
    split: str | None = None
    # Set by a converter whose format has its own corpus (BEIR): the texts negatives are mined from.
    corpus: list[str] | None = None
    # Changes to records that are not skips ("reasoning dropped: over P tokens"), counted for the report.
    notes: collections.Counter = dataclasses.field(default_factory=collections.Counter)


Converter = Callable[[Path, Context], Iterator["Output | Skip"]]


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FormatError(str(path), f"no such file; expected {what}")
    return path


def read_json(path: Path, what: str) -> Any:
    """A whole JSON file (SQuAD, HotpotQA, DPR); a syntax error is named by line and column."""
    require_file(path, what)
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise FormatError(
            f"{path}:{e.lineno}", f"invalid JSON ({e.msg} at column {e.colno}); expected {what}"
        ) from None
    except UnicodeDecodeError as e:
        raise FormatError(str(path), f"not UTF-8 ({e.reason} at byte {e.start}); expected {what}") from None


def read_json_list(path: Path, what: str) -> Iterator[tuple[str, Any]]:
    """("file:[i]", item) for each item of a JSON file whose top level is a list (HotpotQA, DPR)."""
    data = read_json(path, what)
    if not isinstance(data, list):
        raise FormatError(str(path), f"a JSON {type(data).__name__}; expected {what}")
    for i, item in enumerate(data):
        yield f"{path}:[{i}]", item


def read_jsonl(path: Path, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", object) for each non-blank line (`grc_jax.jsonl`'s reading); a bad line
    says why and what was expected."""
    require_file(path, what)
    error = lambda p, line, reason: FormatError(f"{p}:{line}", f"{reason}; expected {what}")  # noqa: E731
    for number, obj in jsonl.read(path, error=error):
        yield f"{path}:{number}", obj


def field(obj: Any, key: str | int, where: str, kind: type | tuple[type, ...], what: str) -> Any:
    """obj[key], checked to be of `kind`; a missing key or another type names `where` and `what`."""
    if isinstance(key, str):
        if not isinstance(obj, dict) or key not in obj:
            raise FormatError(where, f"missing key '{key}'; expected {what}")
        value = obj[key]
    else:
        if not isinstance(obj, (list, tuple)) or not 0 <= key < len(obj):
            raise FormatError(where, f"no item {key}; expected {what}")
        value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # JSON true is no number
        raise FormatError(
            f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]",
            f"a {type(value).__name__}, expected {what}",
        )
    return value


def titled(title: str | None, text: str) -> str:
    """A passage as one document: its title on the first line, as BEIR and DPR retrievers read it."""
    title = (title or "").strip()
    return f"{title}\n{text.strip()}" if title else text.strip()


_TERM = re.compile(r"\w+")


def best_chunk(chunker: Chunker, query: str, text: str) -> str:
    """The chunk of `text` that shares the most distinct words with `query` (the first on a tie):
    a long relevant document's part the query is about. Short texts are their own chunk."""
    chunks = chunker.chunks(text)
    if len(chunks) <= 1:
        return chunks[0] if chunks else text.strip()
    terms = set(_TERM.findall(query.lower()))
    scores = [len(terms & set(_TERM.findall(c.lower()))) for c in chunks]
    return chunks[scores.index(max(scores))]


def first_chunk(chunker: Chunker, text: str) -> str:
    chunks = chunker.chunks(text)
    return chunks[0] if chunks else text.strip()
