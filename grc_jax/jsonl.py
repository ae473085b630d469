"""The one JSONL reader: a file read as (line number, JSON object), with one wording for bad lines.

Lines are numbered from 1; blank lines are skipped; a UTF-8 byte-order mark is allowed on line 1
(editors on Windows write one). A bad line is reported as `file:line: reason`, the reason being
one of

    not UTF-8 (invalid continuation byte at byte 26 of the line)
    invalid JSON (Expecting value at column 1)
    invalid JSON (nested too deeply)
    a JSON array, not a JSON object

Each caller keeps its own error class: `read` takes the factory that turns (path, line, reason)
into the exception to raise, and readers that go on past a bad line (training records with
`data.skip_malformed`) call `parse_line` on each line and catch `LineError`.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Callable, Iterator

from grc_jax.errors import UserError


class LineError(ValueError):
    """One line that is not a JSON object; the message is the reason, without the place."""


class JsonlError(UserError):
    """A bad line of a JSONL file: `path:line: reason` (the default error of `read`)."""

    def __init__(self, path: str | Path, line: int, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{path}:{line}: {reason}")


ErrorFactory = Callable[[Path, int, str], Exception]


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (object, array, string, number, boolean, null)."""
    if value is None:
        return "null"
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), type(value).__name__)


def numbered_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) for every line, the byte-order mark removed from line 1.
    Bytes, decoded by the caller line by line, so that one bad byte makes one bad line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            yield number, raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw


def decode_line(raw: bytes) -> str:
    """A line's text; raises LineError naming the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineError(f"not UTF-8 ({e.reason} at byte {e.start} of the line)") from None


def parse_line(line: bytes | str) -> dict[str, Any]:
    """One non-blank line as a JSON object; raises LineError with the reason otherwise."""
    text = decode_line(line) if isinstance(line, bytes) else line
    try:
        # without its line end, so that a line cut short names its last column, not "column 1"
        obj = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise LineError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:  # json's recursive parser on a line of thousands of nested brackets
        raise LineError("invalid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise LineError(f"a JSON {json_type(obj)}, not a JSON object")
    return obj


def read(path: str | Path, error: ErrorFactory = JsonlError) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of `path`; the first bad line raises
    `error(path, line, reason)`."""
    path = Path(path)
    for number, raw in numbered_lines(path):
        if not raw.strip():
            continue
        try:
            obj = parse_line(raw)
        except LineError as e:
            raise error(path, number, str(e)) from None
        yield number, obj
