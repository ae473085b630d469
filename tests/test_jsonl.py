"""The one JSONL reader (grc_jax/jsonl.py): line numbers, blank lines, the byte-order mark, one
wording for bad lines, and the same reason from every reader that uses it."""

from __future__ import annotations

import pytest

from grc_jax import jsonl
from grc_jax.data import records
from grc_jax.data.formats.common import FormatError
from grc_jax.data.formats.common import read_jsonl as read_format_jsonl
from grc_jax.errors import UserError
from grc_jax.eval.data import InputError
from grc_jax.eval.data import read_jsonl as read_eval_jsonl

BOM = b"\xef\xbb\xbf"


def test_numbers_lines_skips_blank_ones_and_allows_a_bom_on_line_1(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(BOM + b'{"a": 1}\r\n\n   \n{"b": [2]}\n{"c": "\xc3\xa9"}')  # no newline at the end
    assert list(jsonl.read(path)) == [(1, {"a": 1}), (4, {"b": [2]}), (5, {"c": "é"})]


BAD = [
    (b'{"a": 1', "invalid JSON (Expecting ',' delimiter at column 8)"),
    (b'{"a": "caf\xe9"}', "not UTF-8 (invalid continuation byte at byte 10 of the line)"),
    (b"[" * 100_000, "invalid JSON (nested too deeply)"),
    (b"[1, 2]", "a JSON array, not a JSON object"),
    (b'"text"', "a JSON string, not a JSON object"),
    (b"null", "a JSON null, not a JSON object"),
    (b"3.5", "a JSON number, not a JSON object"),
    (BOM + b'{"a": 1}', "invalid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig) at column 1)"),  # only on line 1
]


@pytest.mark.parametrize("line, reason", BAD, ids=[r for _, r in BAD])
def test_a_bad_line_is_named_by_file_line_and_reason(tmp_path, line, reason):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"ok": true}\n\n' + line + b"\n")
    with pytest.raises(jsonl.JsonlError) as error:
        list(jsonl.read(path))
    assert str(error.value) == f"{path}:3: {reason}"
    assert (error.value.path, error.value.line, error.value.reason) == (str(path), 3, reason)
    assert isinstance(error.value, UserError)  # a CLI prints it as one line


def test_every_reader_gives_the_same_reason_in_its_own_error_class(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "fine"}\n[1, 2]\n')
    reason = "a JSON array, not a JSON object"
    with pytest.raises(InputError) as evaluation:
        list(read_eval_jsonl(path))
    assert str(evaluation.value) == f"{path}:2: {reason}"
    with pytest.raises(FormatError) as prepare:
        list(read_format_jsonl(path, "a text record"))
    assert str(prepare.value) == f"{path}:2: {reason}; expected a text record"
    with pytest.raises(UserError) as training:
        records.read_records(path)
    assert str(training.value) == f"{path}:2: {reason}"
    # training records go on past a bad line when asked: one bad line, one skipped record
    kept, skipped = records.read_records(path, skip_malformed=True)
    assert [r.text for r in kept] == ["fine"] and skipped == 1


def test_training_records_allow_a_bom_on_line_1(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(BOM + b'{"text": "one"}\n{"text": "two"}\n')
    kept, _ = records.read_records(path)
    assert [(r.source, r.text) for r in kept] == [(f"{path}:1", "one"), (f"{path}:2", "two")]
