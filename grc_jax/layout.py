"""Token roles: metadata -> attention mask and positions (docs/design.md sections 2 and 3).

Every token carries `example` (packing id, 0 = padding), `segment` (0 for none) and `kind`.
Token i may attend to token j iff they share the example, j is not after i, and
- i is TEXT or LATENT of segment s: j belongs to segment s;
- i is READER: j is a READER, or a LATENT of any segment.
Positions: LATENT j of a segment sits at P + j, the segment's L text tokens at P - L .. P - 1,
and an example's READER tokens count up from P + K.

The host-side `RowBuilder` below lays out every row the project computes (training, evaluation,
the demo and `Engine`), in numpy; `example_pieces` and `pack_rows` pack examples with it.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TEXT, LATENT, READER = 0, 1, 2


class TokenMeta(NamedTuple):
    """Per-token metadata, each int32 [batch, length]."""

    example: jax.Array
    segment: jax.Array
    kind: jax.Array


def attention_mask(meta: TokenMeta) -> jax.Array:
    """bool [batch, length, length]: mask[b, i, j] says whether query i may attend to key j.

    A padding token attends to itself only, so that its softmax stays finite.
    """
    example, segment, kind = (jnp.asarray(a) for a in meta)
    length = example.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    same_example = (example[:, :, None] == example[:, None, :]) & (example[:, :, None] > 0)
    i_reader = (kind == READER)[:, :, None]
    j_reader = (kind == READER)[:, None, :]
    j_latent = (kind == LATENT)[:, None, :]
    j_in_segment_of_i = (segment[:, :, None] == segment[:, None, :]) & ~j_reader
    allowed = jnp.where(i_reader, j_reader | j_latent, j_in_segment_of_i)
    is_padding = (example == 0)[:, :, None]
    return (same_example & causal & allowed) | (is_padding & jnp.eye(length, dtype=bool))


def positions(meta: TokenMeta, max_segment_len: int, num_latents: int) -> jax.Array:
    """int32 [batch, length]: the RoPE position of every token."""
    example, segment, kind = (jnp.asarray(a) for a in meta)
    length = example.shape[-1]
    before = jnp.tril(jnp.ones((length, length), bool), -1)[None]  # j strictly before i
    same_example = example[:, :, None] == example[:, None, :]
    same_segment = same_example & (segment[:, :, None] == segment[:, None, :])

    def count(same: jax.Array, kind_j: int, strictly_before: bool) -> jax.Array:
        hits = same & (kind == kind_j)[:, None, :]
        if strictly_before:
            hits = hits & before
        return hits.sum(-1, dtype=jnp.int32)

    text_pos = max_segment_len - count(same_segment, TEXT, False) + count(same_segment, TEXT, True)
    latent_pos = max_segment_len + count(same_segment, LATENT, True)
    reader_pos = max_segment_len + num_latents + count(same_example, READER, True)
    pos = jnp.select([kind == TEXT, kind == LATENT], [text_pos, latent_pos], reader_pos)
    return jnp.where(example > 0, pos, 0).astype(jnp.int32)


def causal_meta(valid: jax.Array) -> TokenMeta:
    """Metadata of a plain causal LM batch: every valid token is a READER of example 1."""
    valid = jnp.asarray(valid, bool)
    example = valid.astype(jnp.int32)
    return TokenMeta(example, jnp.zeros_like(example), jnp.full_like(example, READER))


def causal_mask(valid: jax.Array) -> jax.Array:
    """attention_mask(causal_meta(valid)), built directly.

    Not merely shorter: jaxlib 0.10.2's CPU compiler aborts ("Cannot select ... and_or_fusion")
    on the general rule constant-folded for an all-READER batch of length 8.
    """
    valid = jnp.asarray(valid, bool)
    i = jnp.arange(valid.shape[-1])
    causal = i[:, None] >= i[None, :]
    both_valid = valid[:, :, None] & valid[:, None, :]
    return (causal & both_valid) | (~valid[:, :, None] & (i[:, None] == i[None, :]))


# --- host-side builders -------------------------------------------------------------------
#
# Every row of the project is laid out here: training (grc_jax/data/builder.py), the held-out
# evaluation, the demo and `Engine` (a memory computed alone) all go through `RowBuilder`, so a
# segment is the same arrays wherever it is computed.


class Row(NamedTuple):
    """One row, numpy int32 [length] each, plus where every segment's latents sit.

    `segment_rows` stacks rows: then each array has a leading batch axis, [rows, length]."""

    tokens: np.ndarray
    example: np.ndarray
    segment: np.ndarray
    kind: np.ndarray
    latent_index: np.ndarray  # [num_segments_in_row, K]: row positions of each segment's latents


def padding(shape: int | tuple[int, ...], pad_id: int = 0) -> tuple[np.ndarray, ...]:
    """(tokens, example, segment, kind) of padding: pad_id tokens of example 0 and no segment,
    marked READER (a padding token attends to itself only, see `attention_mask`)."""
    tokens = np.full(shape, pad_id, np.int32)
    return tokens, np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.full(shape, READER, np.int32)


class RowBuilder:
    """Lays out a row piece by piece, in storage order.

    `new_example` starts the next example (ids count from 1). `add_segment` appends a segment:
    its text (TEXT) then the K latent ids (LATENT), under the next segment id (ids count from 1 in
    the order segments are added, so a segment's slot in `latent_index` is its id - 1).
    `add_reader` appends READER tokens (segment 0). `finish` pads the row.
    """

    def __init__(self, latent_ids: Sequence[int], max_segment_len: int | None = None):
        self.latent_ids = [int(i) for i in latent_ids]
        self.max_segment_len = max_segment_len  # None: the caller has checked segment lengths
        self.num_examples = 0
        self._columns: tuple[list[int], ...] = ([], [], [], [])  # tokens, example, segment, kind
        self._latent_index: list[list[int]] = []

    @property
    def length(self) -> int:
        return len(self._columns[0])

    @property
    def num_segments(self) -> int:
        return len(self._latent_index)

    def new_example(self) -> int:
        self.num_examples += 1
        return self.num_examples

    def add_segment(self, text: Sequence[int]) -> int:
        """Appends `text` and the latents as the next segment of the current example; returns
        the segment's slot."""
        slot = self.num_segments
        P = self.max_segment_len
        if not len(text) or (P is not None and len(text) > P):
            bound = f"1..{P}" if P is not None else "at least 1"
            raise ValueError(f"segment {slot + 1} has {len(text)} tokens; it must have {bound}")
        self._append(text, TEXT, slot + 1)
        start = self.length
        self._append(self.latent_ids, LATENT, slot + 1)
        self._latent_index.append(list(range(start, self.length)))
        return slot

    def add_reader(self, tokens: Sequence[int]) -> int:
        """Appends READER tokens to the current example; returns where they start."""
        start = self.length
        self._append(tokens, READER, 0)
        return start

    def _append(self, tokens: Sequence[int], kind: int, segment: int) -> None:
        if self.num_examples == 0:
            raise ValueError("new_example() must come before the first piece of a row")
        n = len(tokens)
        tokens_column, example, segments, kinds = self._columns
        tokens_column.extend(tokens)
        example.extend([self.num_examples] * n)
        segments.extend([segment] * n)
        kinds.extend([kind] * n)

    def finish(self, length: int | None = None, pad_id: int = 0) -> Row:
        """The row, padded to `length` tokens (None: as long as its pieces)."""
        length = self.length if length is None else length
        if self.length > length:
            raise ValueError(f"the row has {self.length} tokens, more than the row length {length}")
        arrays = padding(length, pad_id)
        for array, column in zip(arrays, self._columns):
            array[: self.length] = column
        K = len(self.latent_ids)
        latent_index = np.asarray(self._latent_index, np.int32).reshape(-1, K) if K else np.zeros((0, 0), np.int32)
        return Row(*arrays, latent_index)


def example_row(
    segments: Sequence[Sequence[int]],
    reader: Sequence[int],
    latent_ids: Sequence[int],
    max_segment_len: int,
    length: int | None = None,
    pad_id: int = 0,
) -> Row:
    """One example alone in a row: its segments (each text then its latents), then the reader;
    padded to `length` (None: no padding)."""
    builder = RowBuilder(latent_ids, max_segment_len)
    builder.new_example()
    for text in segments:
        builder.add_segment(text)
    builder.add_reader(reader)
    return builder.finish(length, pad_id)


def join(rows: Sequence[Row]) -> Row:
    """Rows side by side as one row, as packing puts them: each row's example and segment ids
    follow those of the rows before it, its latent positions move with it; padding stays padding."""
    parts = []
    at = examples = segments = 0
    for row in rows:
        parts.append(
            Row(
                row.tokens,
                np.where(row.example > 0, row.example + examples, 0),
                np.where(row.segment > 0, row.segment + segments, 0),
                row.kind,
                row.latent_index + at,
            )
        )
        at += len(row.tokens)
        examples += int(row.example.max(initial=0))
        segments += len(row.latent_index)
    if not parts:
        return Row(*padding(0), np.zeros((0, 0), np.int32))
    return Row(*(np.concatenate(arrays) for arrays in zip(*parts)))


def segment_rows(
    segments: Sequence[Sequence[int]],
    latent_ids: Sequence[int],
    max_segment_len: int,
    length: int,
    num_rows: int | None = None,
    pad_id: int = 0,
) -> Row:
    """Each segment alone in its row, `[text][K latents]` as example 1 then padding: how a
    memory or an embedding is computed on its own (`Engine`). Stacked: tokens, example, segment
    and kind [num_rows, length], latent_index [num_rows, K]; rows past the segments (num_rows
    defaults to their number) are all padding, with latent_index 0."""
    num_rows = len(segments) if num_rows is None else num_rows
    if num_rows < len(segments):
        raise ValueError(f"{len(segments)} segments do not fit {num_rows} rows")
    rows = []
    for text in segments:
        builder = RowBuilder(latent_ids, max_segment_len)
        builder.new_example()
        builder.add_segment(text)
        rows.append(builder.finish(length, pad_id))
    arrays = [
        np.stack([getattr(r, f) for r in rows]) if rows else np.zeros((0, length), np.int32)
        for f in ("tokens", "example", "segment", "kind")
    ]
    latent_index = np.zeros((num_rows, len(latent_ids)), np.int32)
    latent_index[: len(rows)] = [r.latent_index[0] for r in rows]
    pad = padding((num_rows - len(rows), length), pad_id)
    return Row(*(np.concatenate([a, p]) for a, p in zip(arrays, pad)), latent_index)


def split_segments(tokens: Sequence[int], max_segment_len: int) -> list[list[int]]:
    """Cuts a long text into segments of at most `max_segment_len` tokens."""
    if not len(tokens):
        raise ValueError("cannot split an empty text into segments")
    return [list(tokens[i : i + max_segment_len]) for i in range(0, len(tokens), max_segment_len)]


def example_pieces(
    segments: Sequence[Sequence[int]], reader: Sequence[int], latent_ids: Sequence[int], max_segment_len: int
) -> list[tuple[int, int, list[int]]]:
    """One example as (kind, local segment id, tokens) pieces: each segment's text then its
    latents, then the reader tokens (which see the segments only through their latents)."""
    pieces = []
    for s, text in enumerate(segments, start=1):
        if not 1 <= len(text) <= max_segment_len:
            raise ValueError(f"segment {s} has {len(text)} tokens; it must have 1..{max_segment_len}")
        pieces.append((TEXT, s, list(text)))
        pieces.append((LATENT, s, list(latent_ids)))
    if len(reader):
        pieces.append((READER, 0, list(reader)))
    return pieces


def pack_rows(examples: Sequence[Sequence[tuple[int, int, list[int]]]], length: int, pad_id: int = 0) -> list[Row]:
    """Packs examples (from `example_pieces`) greedily into rows of `length` tokens.

    Segment ids are renumbered to be unique within a row, so a row's latent_index lists its
    segments in storage order.
    """
    rows: list[Row] = []
    current: list[Sequence[tuple[int, int, list[int]]]] = []
    used = 0
    for n, pieces in enumerate(examples):
        size = sum(len(tokens) for _, _, tokens in pieces)
        if size > length:
            raise ValueError(f"example {n} has {size} tokens, more than the row length {length}")
        if used + size > length:
            rows.append(_build_row(current, length, pad_id))
            current, used = [], 0
        current.append(pieces)
        used += size
    if current:
        rows.append(_build_row(current, length, pad_id))
    return rows


def _build_row(examples: Sequence[Sequence[tuple[int, int, list[int]]]], length: int, pad_id: int) -> Row:
    # example_pieces has checked the segments' lengths, and gives each segment's latents right
    # after its text: RowBuilder.add_segment lays both out.
    latent_ids = next((t for pieces in examples for kind, _, t in pieces if kind == LATENT), [])
    builder = RowBuilder(latent_ids)
    for pieces in examples:
        builder.new_example()
        for kind, _, tokens in pieces:
            if kind == TEXT:
                builder.add_segment(tokens)
            elif kind == READER:
                builder.add_reader(tokens)
            elif list(tokens) != builder.latent_ids:
                raise ValueError("the examples of a row must use the same meta latent tokens")
    return builder.finish(length, pad_id)
