"""The training input pipeline: JSONL records -> packed rows -> per-host batches, with grain.

ArrayRecord files, or a weighted mixture of sources, go through `streaming.py` instead: read
lazily, each host only its share of the records (see `make_dataset`).

`make_dataset` reads and tokenizes every record once and keeps them in memory, which suits
datasets of up to a few million records (the demo world, fine-tuning sets); it then *plans*
the packing of every row of the run, epoch by epoch, as lists of record indices, and builds a
batch's rows only when grain asks for it. A batch is a pure function of (files, seed, step), so
resuming needs only grain's iterator state (the next step).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import grain
import numpy as np
from absl import logging

from grc_jax.data import seqio_source, streaming
from grc_jax.data.arrayrecord import is_arrayrecord
from grc_jax.data.builder import (
    BuildConfig,
    TokenizedRecord,
    Unit,
    build_unit,
    plan_rows,
    rows_to_batch,
    tokenize_records,
    unit_rng,
)
from grc_jax.data.records import read_records
from grc_jax.errors import UserError
from grc_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PackingPlan:
    """Which records fill which row: rows[r] = (epoch, record indices in storage order)."""

    records: list[TokenizedRecord]
    config: BuildConfig
    seed: int
    rows: list[tuple[int, tuple[int, ...]]]
    skipped: int  # records that cannot be laid out (too long for a row, a query over P tokens, ...)
    padding_fraction: float
    epochs: int

    def build_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The batch of rows [start, stop)."""
        return rows_to_batch(
            [[self._unit(epoch, i) for i in indices] for epoch, indices in self.rows[start:stop]], self.config
        )

    def _unit(self, epoch: int, index: int) -> Unit:
        return build_unit(self.records[index], self.config, unit_rng(self.seed, epoch, index))


class NoUsableRecords(UserError):
    pass


def plan_packing(
    records: Sequence[TokenizedRecord], config: BuildConfig, *, num_rows: int, seed: int, skip_malformed: bool = False
) -> PackingPlan:
    """Plans `num_rows` rows: each epoch shuffles the records with (seed, epoch) and packs them
    greedily; an epoch's last row is not topped up from the next epoch."""
    usable, sizes, skipped = _measure(records, config, seed, skip_malformed)
    if not usable:
        raise NoUsableRecords("no usable training records")
    rows: list[tuple[int, tuple[int, ...]]] = []
    epoch = 0
    while len(rows) < num_rows:
        order = np.random.default_rng([seed, epoch]).permutation(len(usable))
        for row in plan_rows([sizes[i] for i in order], config.row_len, config.max_segments_per_row):
            rows.append((epoch, tuple(int(order[j]) for j in row)))
        epoch += 1
    rows = rows[:num_rows]
    used = sum(sizes[i][0] for _, row in rows for i in row)
    padding = 1.0 - used / (len(rows) * config.row_len) if rows else 0.0
    return PackingPlan(usable, config, seed, rows, skipped, padding, epoch)


def _measure(
    records: Sequence[TokenizedRecord], config: BuildConfig, seed: int, skip_malformed: bool
) -> tuple[list[TokenizedRecord], list[tuple[int, int]], int]:
    """Lays every record out once: its size does not depend on the epoch, only its order does."""
    usable: list[TokenizedRecord] = []
    sizes: list[tuple[int, int]] = []
    skipped = 0
    for record in records:
        try:
            unit = build_unit(record, config, unit_rng(seed, 0, len(usable)))
        except ValueError as e:
            if not skip_malformed:
                raise
            skipped += 1
            logging.warning("skipping record: %s", e)
            continue
        usable.append(record)
        sizes.append((unit.length, unit.num_segments))
    return usable, sizes, skipped


class _HostBatch:
    """step -> this host's rows of global batch `step`: block `block` of `blocks` equal blocks."""

    def __init__(self, plan: PackingPlan, global_batch: int, block: int, blocks: int):
        self.plan = plan
        self.global_batch = global_batch
        self.rows = global_batch // blocks
        self.offset = block * self.rows

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        start = step * self.global_batch + self.offset
        return self.plan.build_rows(start, start + self.rows)


def make_dataset(
    files: Sequence[str | Path] | str | Path,
    tokenizer: Tokenizer,
    build_config: BuildConfig,
    *,
    global_batch: int,
    num_steps: int,
    seed: int,
    block: int = 0,
    blocks: int = 1,
    skip_malformed: bool = False,
    mixture: str | None = None,
) -> grain.MapDataset | grain.IterDataset:
    """A grain MapDataset of `num_steps` elements; element i is this host's share of global
    batch i: block b of B, rows [i*G + b*G/B, i*G + (b+1)*G/B) of the plan, as the dict of
    `builder.empty_batch`. `sharding.host_batch_block` gives a host its (b, B): hosts that hold
    the same rows (a tensor axis across hosts) load the same block.

    Every host reads and tokenizes all records into memory (fine for in-memory datasets, up to a
    few million records) and computes the same plan, so hosts agree on the global batch without
    talking to each other.

    `files` may hold glob patterns. If any file is ArrayRecord, or `mixture` ("FILES:WEIGHT,...",
    see `streaming.parse_mixture`) is given instead of files, the result is `streaming`'s endless
    IterDataset: records read lazily, each host block only its share, weighted sources mixed.
    """
    _check_sharding(global_batch, num_steps, block, blocks)
    if isinstance(files, (str, Path)):
        files = [files]
    files = [str(f) for f in files]
    if mixture:
        if files:
            raise ValueError("config: give data.train_files or data.mixture, not both")
        sources = streaming.parse_mixture(mixture)
    else:
        files = [g for f in files for g in ([f] if seqio_source.is_seqio_source(f) else streaming.expand([f]))]
        sources = [(files, 1.0)] if any(is_arrayrecord(f) for f in files) else None
    if sources is not None:
        if any(seqio_source.is_seqio_source(f) for fs, _ in sources for f in fs):
            raise ValueError("data: seqio tasks cannot be mixed with ArrayRecord files or data.mixture")
        return streaming.make_streaming_dataset(
            sources,
            tokenizer,
            build_config,
            global_batch=global_batch,
            seed=seed,
            block=block,
            blocks=blocks,
            skip_malformed=skip_malformed,
        )
    records, skipped_lines = read_records(files, skip_malformed=skip_malformed)
    tokenized = tokenize_records(records, tokenizer.encode_batch)
    _warn_long_documents(tokenized, build_config)
    try:
        plan = plan_packing(
            tokenized, build_config, num_rows=num_steps * global_batch, seed=seed, skip_malformed=skip_malformed
        )
    except NoUsableRecords as e:  # name the files: an empty or blank one is the usual cause
        names = [str(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
        raise NoUsableRecords(
            f"{e} in {', '.join(names)} ({len(records)} record(s) read, {skipped_lines} malformed line(s) skipped)"
        ) from None
    logging.info(
        "data: %d records -> %d rows over %d epoch(s), padding fraction %.3f; skipped %d malformed "
        "line(s) and %d record(s) that cannot be laid out",
        len(plan.records),
        len(plan.rows),
        plan.epochs,
        plan.padding_fraction,
        skipped_lines,
        plan.skipped,
    )
    return grain.MapDataset.range(num_steps).map(_HostBatch(plan, global_batch, block, blocks))


def _warn_long_documents(records: Sequence[TokenizedRecord], config: BuildConfig) -> None:
    max_segment_len = config.max_segment_len
    long = [
        r.source
        for r in records  # the negatives past max_negatives are never used
        if any(len(d) > max_segment_len for d in (r.positive or [], *r.negatives[: config.max_negatives]))
    ]
    if long:
        logging.warning(
            "data: %d of %d records have documents longer than max_segment_len=%d tokens (first: %s); "
            "they are cut to that length, so answers past the cut are not in the memory: split long "
            "documents into several records, or raise model.max_segment_len",
            len(long),
            len(records),
            max_segment_len,
            long[0],
        )


def _check_sharding(global_batch: int, num_steps: int, block: int, blocks: int) -> None:
    if global_batch < 1 or num_steps < 1:
        raise ValueError(f"global_batch and num_steps must be positive, got {global_batch} and {num_steps}")
    if blocks < 1 or not 0 <= block < blocks:
        raise ValueError(f"block {block} is not in [0, blocks={blocks})")
    if global_batch % blocks:
        raise ValueError(f"global_batch {global_batch} does not split into {blocks} host blocks")


def make_iterator(
    dataset: grain.MapDataset | grain.IterDataset, *, prefetch_threads: int = 0, prefetch_buffer_size: int = 0
) -> grain.DatasetIterator:
    """An iterator with get_state()/set_state(): a restored state resumes at exactly the next
    batch. No threads or processes unless asked for (a streaming dataset reads records ahead in
    `streaming.READ_THREADS` threads of its own, in order)."""
    if isinstance(dataset, grain.IterDataset):
        return iter(dataset)
    options = grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=prefetch_buffer_size)
    return iter(dataset.to_iter_dataset(options))
