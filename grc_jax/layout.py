"""Token roles: metadata -> attention mask and positions (docs/design.md sections 2 and 3).

Every token carries `example` (packing id, 0 = padding), `segment` (0 for none) and `kind`.
Token i may attend to token j iff they share the example, j is not after i, and
- i is TEXT or LATENT of segment s: j belongs to segment s;
- i is READER: j is a READER, or a LATENT of any segment.
Positions: LATENT j of a segment sits at P + j, the segment's L text tokens at P - L .. P - 1,
and an example's READER tokens count up from P + K.

The host-side builders below lay out examples and pack them into rows, in numpy.
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


class Row(NamedTuple):
    """One packed row, numpy int32 [length] each, plus where every segment's latents sit."""

    tokens: np.ndarray
    example: np.ndarray
    segment: np.ndarray
    kind: np.ndarray
    latent_index: np.ndarray  # [num_segments_in_row, K]: row positions of each segment's latents


def split_segments(tokens: Sequence[int], max_segment_len: int) -> list[list[int]]:
    """Cuts a long text into segments of at most `max_segment_len` tokens."""
    if not len(tokens):
        raise ValueError("cannot split an empty text into segments")
    return [list(tokens[i:i + max_segment_len]) for i in range(0, len(tokens), max_segment_len)]


def example_pieces(segments: Sequence[Sequence[int]], reader: Sequence[int],
                   latent_ids: Sequence[int], max_segment_len: int) -> list[tuple[int, int, list[int]]]:
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


def pack_rows(examples: Sequence[Sequence[tuple[int, int, list[int]]]], length: int,
              pad_id: int = 0) -> list[Row]:
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
    tokens, example, segment, kind = (np.zeros(length, np.int32) for _ in range(4))
    tokens[:] = pad_id
    kind[:] = READER
    latent_index: list[list[int]] = []
    at, next_segment = 0, 1
    for ex_id, pieces in enumerate(examples, start=1):
        local_to_row: dict[int, int] = {}
        for piece_kind, local_segment, piece_tokens in pieces:
            end = at + len(piece_tokens)
            tokens[at:end], example[at:end], kind[at:end] = piece_tokens, ex_id, piece_kind
            if piece_kind != READER:
                if local_segment not in local_to_row:
                    local_to_row[local_segment] = next_segment
                    next_segment += 1
                segment[at:end] = local_to_row[local_segment]
            if piece_kind == LATENT:
                latent_index.append(list(range(at, end)))
            at = end
    latents = np.asarray(latent_index, np.int32) if latent_index else np.zeros((0, 0), np.int32)
    return Row(tokens, example, segment, kind, latents)
