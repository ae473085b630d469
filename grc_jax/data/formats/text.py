"""Plain text files (a file, or a directory of *.txt) or JSONL with a text field -> {text} records.

Each document (a whole text file, or one JSONL line's field) is cut into chunks of at most P
tokens (--max-segment-len), one record each; a chunk's source is the line it starts on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from grc_jax.data.formats.common import Context, FormatError, Output, Skip, field, read_jsonl


def convert(path: Path, ctx: Context) -> Iterator[Output | Skip]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FormatError(str(path), "no *.txt files; expected text files or a JSONL file")
    elif path.is_file():
        files = [path]
    else:
        raise FormatError(str(path), "no such file or directory; expected a text file, a directory of *.txt or JSONL")
    for file in files:
        if file.suffix.lower() == ".jsonl":
            what = f"a JSON object with a text field '{ctx.text_field}' (choose it with --text-field)"
            for where, obj in read_jsonl(file, what):
                yield from _chunks(field(obj, ctx.text_field, where, str, what), where, ctx)
        else:
            try:
                text = file.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as e:
                raise FormatError(
                    str(file), f"not UTF-8 ({e.reason} at byte {e.start}); expected a text file"
                ) from None
            for a, b in ctx.chunker.spans(text):
                yield Output({"text": text[a:b]}, f"{file}:{text.count(chr(10), 0, a) + 1}")
            if not text.strip():
                yield Skip("empty document", str(file))


def _chunks(text: str, where: str, ctx: Context) -> Iterator[Output | Skip]:
    spans = ctx.chunker.spans(text)
    if not spans:
        yield Skip("empty document", where)
    for a, b in spans:
        yield Output({"text": text[a:b]}, where)
