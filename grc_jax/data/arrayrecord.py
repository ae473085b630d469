"""ArrayRecord shards of GRC records (grain's random-access format): one record per entry, stored
as the UTF-8 JSON of its JSONL line, so both formats hold the same bytes."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from array_record.python import array_record_module

SUFFIXES = (".arrayrecord", ".array_record")


def is_arrayrecord(path: str | Path) -> bool:
    return str(path).endswith(SUFFIXES)


def write_shards(
    lines: Sequence[bytes], out_dir: str | Path, records_per_shard: int, name: str = "records"
) -> list[Path]:
    """Writes `lines` to <name>-SSSSS-of-NNNNN.arrayrecord shards; each shard is written under a
    temporary name and renamed, so a killed run leaves no truncated shard under the final name."""
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    count = max(1, math.ceil(len(lines) / records_per_shard))
    paths = []
    for s in range(count):
        path = out_dir / f"{name}-{s:05d}-of-{count:05d}{SUFFIXES[0]}"
        tmp = path.with_name(path.name + ".tmp")
        # group_size:1: every record is its own chunk, for cheap random access.
        writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
        for line in lines[s * records_per_shard : (s + 1) * records_per_shard]:
            writer.write(line)
        writer.close()
        os.replace(tmp, path)
        paths.append(path)
    return paths


class ArrayRecordSource:
    """Random access over the records of several shards: source[i] -> ("file:record j", bytes).
    Records are read only when asked for."""

    def __init__(self, paths: Sequence[str | Path]):
        import grain

        self.paths = [str(p) for p in paths]
        for path in self.paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such ArrayRecord file")
        counts = []
        for path in self.paths:
            try:
                reader = array_record_module.ArrayRecordReader(path)
            except Exception as e:  # the C++ reader raises a bare error for a file that is not ArrayRecord
                raise ValueError(f"{path}: not an ArrayRecord file ({e})") from None
            counts.append(reader.num_records())
            reader.close()
        self.starts = np.cumsum([0] + counts)
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> tuple[str, bytes]:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return f"{self.paths[shard]}:record {index - int(self.starts[shard])}", self._source[index]
