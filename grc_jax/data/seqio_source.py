"""Training records from a seqio Task or Mixture (the `seqio` extra, which pulls TensorFlow).

    --config.data.train_files=seqio:my_task[:split] --config.data.seqio_modules=my_project.tasks

An entry `seqio:NAME` or `seqio:NAME:SPLIT` (default split: train) of `data.train_files` reads
every example of that registered Task or Mixture once, in order (no shuffling: the packing plan
shuffles), and treats each as one JSONL line, so the checks and `data.skip_malformed` of
`records.py` apply unchanged; a bad example is named `seqio:NAME:SPLIT#INDEX`.

Each record field is taken from the example's feature `<field>_pretokenized` (what
`seqio.preprocessors.tokenize` keeps of the raw text) or else `<field>`; the fields are those of
docs/design.md section 4 (`query`, `reasoning`, `positive`, `negatives`, `question`, `answer`,
`text`) and other features are ignored. As a tf.data example has the same features as every
other, an empty string (or an empty `negatives`) stands for an absent field. Text is needed, not
token ids: grc_jax tokenizes with the model's tokenizer. `data.seqio_modules` names the modules
to import first, those that register the tasks.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Iterator, Mapping

import numpy as np

from grc_jax.data.records import FIELDS
from grc_jax.errors import UserError

PREFIX = "seqio:"


def is_seqio_source(entry: Any) -> bool:
    return isinstance(entry, str) and entry.startswith(PREFIX)


def parse_source(entry: str) -> tuple[str, str]:
    """`seqio:NAME[:SPLIT]` -> (NAME, SPLIT)."""
    name, colon, split = entry[len(PREFIX) :].partition(":")
    if not name or (colon and not split):
        raise UserError(f"data.train_files entry {entry!r}: expected seqio:TASK_NAME or seqio:TASK_NAME:SPLIT")
    return name, split or "train"


def import_task_modules(modules: str) -> None:
    """Imports the comma-separated `modules`, whose import registers seqio tasks."""
    for module in filter(None, (m.strip() for m in modules.split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"config: data.seqio_modules: cannot import {module!r}: {e}") from e


def example_lines(entry: str) -> Iterator[tuple[str, bytes]]:
    """(source, JSON line) for every example of the seqio source `entry`."""
    name, split = parse_source(entry)
    try:
        import seqio
    except ImportError as e:
        raise ImportError(f"data.train_files entry {entry!r} needs seqio: pip install 'grc_jax[seqio]'") from e
    try:
        task = seqio.get_mixture_or_task(name)
    except ValueError as e:
        raise UserError(
            f"data.train_files entry {entry!r}: no seqio Task or Mixture {name!r} is registered; "
            f"name the module that registers it in data.seqio_modules ({e})"
        ) from None
    dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1, use_cached=False)
    for index, example in enumerate(dataset.as_numpy_iterator()):
        source = f"{PREFIX}{name}:{split}#{index}"
        yield source, json.dumps(example_record(example, source), ensure_ascii=False).encode("utf-8")


def example_record(example: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The record fields of one seqio example, as JSON values (not yet checked: `records.py` does that)."""
    if not any(f in example or f"{f}_pretokenized" in example for f in FIELDS):
        raise UserError(
            f"{source}: the example has none of the features {', '.join(FIELDS)} "
            f"(or <field>_pretokenized); its features: {', '.join(sorted(example))}"
        )
    record: dict[str, Any] = {}
    for field in FIELDS:
        key = next((k for k in (f"{field}_pretokenized", field) if k in example), None)
        if key is not None:
            value = _texts(example[key], source, key) if field == "negatives" else _text(example[key], source, key)
            if value:  # tf.data gives every example the same features: an empty one stands for an absent field
                record[field] = value
    return record


def _text(value: Any, source: str, key: str) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{source}: feature {key!r} is not UTF-8: {e.reason} at byte {e.start}") from None
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.number):
        raise UserError(
            f"{source}: feature {key!r} holds token ids, not text; grc_jax tokenizes with the "
            f"model's tokenizer (seqio.preprocessors.tokenize keeps the text as '<field>_pretokenized')"
        )
    raise UserError(f"{source}: feature {key!r} must be a string, got {type(value).__name__}")


def _texts(value: Any, source: str, key: str) -> list[str]:
    if not isinstance(value, (np.ndarray, list, tuple)) or (isinstance(value, np.ndarray) and value.ndim != 1):
        raise UserError(f"{source}: feature {key!r} must be a 1-D list of strings, got {type(value).__name__}")
    return [_text(v, source, f"{key}[{i}]") for i, v in enumerate(value)]
