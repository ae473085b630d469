"""The scalable input path: ArrayRecord (or JSONL) sources read lazily, each host only its share,
mixed by weight, packed into rows as they come.

Each source's records are numbered 0..N-1 over its files in order; host block b of B reads the
records i with i % B == b (`share`), never the others. It shuffles its share anew each epoch
(grain's index shuffle, nothing held in memory), mixes the sources' record streams by weight
(grain's `MapDataset.mix`: a deterministic interleaving in which source s supplies a fraction
w_s / sum(w) of the records), lays each record out and packs the units greedily into this host's
rows. So the batch of a host is its own: unlike `pipeline.make_dataset`'s global plan, the global
batch depends on the number of host blocks. Resuming restores grain's iterator state (the next
record index) at the first record of the next batch's first row, so it is exact.
"""

from __future__ import annotations

import glob
from typing import Any, Sequence

import grain
import numpy as np
from absl import logging

from grc_jax import jsonl
from grc_jax.data.arrayrecord import ArrayRecordSource, is_arrayrecord
from grc_jax.data.builder import BuildConfig, Unit, build_unit, rows_to_batch, tokenize_records
from grc_jax.data.records import parse_record
from grc_jax.tokenizer import Tokenizer

Source = tuple[list[str], float]  # the files of one source, and its weight
READ_THREADS, PREFETCH_RECORDS = 4, 256


def expand(entries: Sequence[str]) -> list[str]:
    """File names, with glob patterns replaced by their sorted matches; a pattern that matches
    nothing is an error (a typo would otherwise silently train on less data)."""
    files: list[str] = []
    for entry in entries:
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry))
            if not matches:
                raise FileNotFoundError(f"data: no files match {entry!r}")
            files += matches
        else:
            files.append(entry)
    return files


def parse_mixture(spec: str) -> list[Source]:
    """ "GLOB:WEIGHT,GLOB:WEIGHT,..." -> [(files, weight)]; a source's files are those its glob
    (or file name) matches, and weights need not sum to 1."""
    sources: list[Source] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        pattern, sep, weight = entry.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not pattern or not value > 0:
            raise ValueError(
                f"config: data.mixture entry {entry!r} must be FILES:WEIGHT with FILES a file or glob "
                f"and WEIGHT a number > 0"
            )
        sources.append((expand([pattern]), value))
    if not sources:
        raise ValueError("config: data.mixture names no source")
    return sources


def share(num_records: int, block: int, blocks: int) -> range:
    """The record indices host block `block` of `blocks` reads: every blocks-th from block."""
    return range(block, num_records, blocks)


class _JsonlShare:
    """The share's non-blank lines of JSONL files, as ("file:line", bytes); the rest is not kept."""

    def __init__(self, files: Sequence[str], block: int, blocks: int):
        self.lines: list[tuple[str, bytes]] = []
        count = 0
        for file in files:
            for number, raw in jsonl.numbered_lines(file):
                if raw.strip():
                    if count % blocks == block:
                        self.lines.append((f"{file}:{number}", raw))
                    count += 1
        self.total = count

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> tuple[str, bytes]:
        return self.lines[index]


def source_share(files: Sequence[str], block: int, blocks: int) -> tuple[grain.MapDataset, int]:
    """This host's share of one source's records as a MapDataset of ("where", bytes), and the
    source's total record count."""
    kinds = {is_arrayrecord(f) for f in files}
    if len(kinds) > 1:
        raise ValueError(
            f"data: a source mixes ArrayRecord and JSONL files ({', '.join(files)}); give them as "
            "separate mixture sources"
        )
    if kinds == {True}:
        source = ArrayRecordSource(files)
        return grain.MapDataset.source(source)[block::blocks], len(source)
    jsonl = _JsonlShare(files, block, blocks)
    return grain.MapDataset.source(jsonl), jsonl.total


class _LayOut:
    """(stream index, ("where", bytes)) -> the record's Unit, or None for a skipped record."""

    def __init__(self, tokenizer: Tokenizer, config: BuildConfig, seed: int, source_id: int, skip_malformed: bool):
        self.tokenizer, self.config, self.seed, self.source_id = tokenizer, config, seed, source_id
        self.skip_malformed = skip_malformed

    def __call__(self, index: int, item: tuple[str, bytes]) -> Unit | None:
        where, raw = item
        try:
            record = parse_record(raw, where)
            tokenized = tokenize_records([record], self.tokenizer.encode_batch)[0]
            return build_unit(tokenized, self.config, np.random.default_rng([self.seed, self.source_id, index]))
        except ValueError as e:
            if not self.skip_malformed:
                raise ValueError(f"{e} (data.skip_malformed=True skips such records)") from None
            logging.warning("skipping record: %s", e)
            return None


def make_streaming_dataset(
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    config: BuildConfig,
    *,
    global_batch: int,
    seed: int,
    block: int = 0,
    blocks: int = 1,
    skip_malformed: bool = False,
) -> grain.IterDataset:
    """An endless IterDataset of this host's batches (rows global_batch/blocks), as
    `pipeline.make_dataset`'s elements."""
    streams, weights = [], []
    for s, (files, weight) in enumerate(sources):
        records, total = source_share(files, block, blocks)
        if len(records) == 0:
            raise ValueError(
                f"data: source {', '.join(files)} has {total} record(s), none for host block {block} of {blocks}"
            )
        logging.info(
            "data: source %d (%s, weight %g): %d records, %d read by host block %d of %d",
            s,
            ", ".join(files),
            weight,
            total,
            len(records),
            block,
            blocks,
        )
        stream = records.shuffle(seed=int(np.random.default_rng([seed, s]).integers(2**31))).repeat(None)
        streams.append(stream.map_with_index(_LayOut(tokenizer, config, seed, s, skip_malformed)))
        weights.append(weight)
    mixed = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)
    units = mixed.filter(lambda unit: unit is not None)
    # Records are read and laid out ahead in threads; grain keeps their order and its state is one index.
    options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_RECORDS)
    return _PackedBatches(units.to_iter_dataset(options), config, global_batch // blocks)


class _PackedBatches(grain.IterDataset):
    """Units -> batches of `rows` rows, each row packed greedily in stream order."""

    def __init__(self, parent: grain.IterDataset, config: BuildConfig, rows: int):
        super().__init__(parent)
        self.config, self.rows = config, rows

    def __iter__(self) -> "_PackedBatchIterator":
        return _PackedBatchIterator(self._parent.__iter__(), self.config, self.rows)


class _PackedBatchIterator(grain.DatasetIterator):
    """The state is the unit stream's state just before the next batch's first unit: a unit read
    to find that a row is full waits in `_pending`, and a restore reads it again."""

    def __init__(self, parent: grain.DatasetIterator, config: BuildConfig, rows: int):
        super().__init__(parent)
        self.config, self.rows = config, rows
        self._pending: tuple[Unit, dict[str, Any]] | None = None

    def _peek(self) -> Unit:
        if self._pending is None:
            before = self._parent.get_state()
            self._pending = (next(self._parent), before)
        return self._pending[0]

    def __next__(self) -> dict[str, np.ndarray]:
        L, S = self.config.row_len, self.config.max_segments_per_row
        rows: list[list[Unit]] = []
        while len(rows) < self.rows:
            row: list[Unit] = []
            tokens = segments = 0
            while True:
                unit = self._peek()
                if unit.length > L or unit.num_segments > S:  # build_unit refuses these; a guard
                    raise ValueError(
                        f"{unit.source}: record needs {unit.length} tokens and {unit.num_segments} "
                        f"segments; a row holds {L} and {S}"
                    )
                if row and (tokens + unit.length > L or segments + unit.num_segments > S):
                    break
                row.append(unit)
                tokens, segments = tokens + unit.length, segments + unit.num_segments
                self._pending = None
            rows.append(row)
        return rows_to_batch(rows, self.config)

    def get_state(self) -> dict[str, Any]:
        return dict(self._pending[1]) if self._pending is not None else self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)
        self._pending = None
