"""GRC records already in JSONL (the schema of grc_jax/data/records.py): checked and rewritten,
for instance into ArrayRecord shards. Nothing is chunked: the records are taken as they are."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Iterator

from grc_jax.data import records
from grc_jax.data.formats.common import Context, FormatError, Output, Skip, require_file


def convert(path: Path, ctx: Context) -> Iterator[Output | Skip]:
    del ctx
    require_file(path, "a JSONL file of GRC records")
    try:
        parsed, _ = records.read_records([path])
    except ValueError as e:  # records.py says "file:line: why"
        match = re.match(r"^(.*?:\d+): (.*)$", str(e), re.S)
        raise (FormatError(match[1], f"{match[2]}; expected a GRC record") if match else e) from None
    for record in parsed:
        fields = {k: v for k, v in dataclasses.asdict(record).items() if k != "source" and v not in (None, ())}
        if "negatives" in fields:
            fields["negatives"] = list(fields["negatives"])
        yield Output(fields, record.source)
