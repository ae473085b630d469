"""Turning training records into packed GRC rows (docs/design.md sections 2 and 4).

A record becomes one *unit*: one or more examples that always share a row, because the
query's positive must be a segment of the same row (the representative loss finds it by
slot) and the reader must see the positive's memory.

- `text`: a READER-only example `[text][eos]`, generative loss on every token but the first.
- `query` (+ `reasoning`): a *query segment* `[query]` or `[query][reasoning][eor]` and its K
  latents, alone in its example; generative loss on the reasoning and eor.
- `positive`, `negatives`: *document segments* (text cut to P tokens, then K latents),
  generative loss on their text. With `question`+`answer`, a reader example holds the positive
  and up to `reader_distractors` negatives in a shuffled order, then `[question][answer][eos]`
  with the compressive loss on the answer and eos. Without them, `reader_task` decides:
  "reconstruction" (reader `[bos][document][eos]`), "continuation" (the segment keeps the
  first half of the document, the reader `[bos][second half][eos]`) or "none". Those readers
  see the positive only: with distractors and no question, nothing tells the reader which
  memory to reproduce. Negatives the reader does not see go into a segments-only example,
  where they still serve the representative loss.
- With `question_segments` (memory priors, docs/design.md section 8), a reader's question is
  laid out once more as a *question segment* `[question]` with its K latents, alone in its
  example; `seg_question` gives every memory the reader sees that segment's slot, so the
  question's embedding can weigh the reader's memories. No loss is taken on it.

Loss on token t is stored at the position p just before it: `targets[p] = tokens[t]` and the
loss's weight at p is 1. p is always t - 1 in storage, in the same example and in t's context.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Iterator, Sequence

import numpy as np

from grc_jax.data.records import Record
from grc_jax.errors import UserError
from grc_jax.layout import Row, RowBuilder, join, padding

READER_TASKS = ("continuation", "reconstruction", "none")
SEG_UNUSED, SEG_QUERY, SEG_DOCUMENT, SEG_QUESTION = 0, 1, 2, 3
BATCH_KEYS = (
    "tokens",
    "example",
    "segment",
    "kind",
    "targets",
    "gen_weight",
    "comp_weight",
    "seg_latent_index",
    "seg_kind",
    "seg_positive",
    "seg_doc_id",
)
# Only with BuildConfig.question_segments: per segment slot, the slot of the question segment of
# the reader that sees it as a memory, or -1.
PRIOR_KEYS = ("seg_question",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """How records become rows. P = max_segment_len, K = num_latents, S = max_segments_per_row."""

    max_segment_len: int
    num_latents: int
    latent_ids: tuple[int, ...]
    row_len: int
    max_segments_per_row: int
    bos_id: int
    eos_id: int
    eor_id: int
    pad_id: int = 0
    max_negatives: int = 7
    reader_distractors: int = 4
    # Reconstruction keeps the whole positive in its segment, so the embedding the
    # representative loss sees is the document's, not half of it.
    reader_task: str = "reconstruction"
    # Memory priors: lay every reader's question out as a segment too (see the module doc).
    question_segments: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "latent_ids", tuple(int(i) for i in self.latent_ids))
        if len(self.latent_ids) != self.num_latents or self.num_latents < 1:
            raise UserError(f"need num_latents >= 1 latent ids, got {len(self.latent_ids)} for K={self.num_latents}")
        if self.reader_task not in READER_TASKS:
            raise UserError(f"reader_task must be one of {READER_TASKS}, got {self.reader_task!r}")
        for name in ("max_segment_len", "row_len", "max_segments_per_row"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_negatives", "reader_distractors"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class TokenizedRecord:
    """A Record's fields as token ids (no special tokens), plus the ids of its documents."""

    source: str
    query: list[int] | None = None
    reasoning: list[int] | None = None
    positive: list[int] | None = None
    negatives: tuple[list[int], ...] = ()
    question: list[int] | None = None
    answer: list[int] | None = None
    text: list[int] | None = None
    positive_doc_id: int = -1
    negative_doc_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Documents without ids would silently vanish (zip) or escape the duplicate mask (-1).
        if len(self.negative_doc_ids) != len(self.negatives):
            raise UserError(
                f"{self.source}: {len(self.negatives)} negatives but {len(self.negative_doc_ids)} negative_doc_ids"
            )
        if (self.positive is not None) != (self.positive_doc_id >= 0):
            raise UserError(f"{self.source}: a positive needs a positive_doc_id >= 0, and only a positive")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One record laid out: int32 [n] token arrays with local (1-based) example and segment ids,
    and per-segment arrays [s] in storage order (slot j is segment id j + 1)."""

    source: str
    tokens: np.ndarray
    example: np.ndarray
    segment: np.ndarray
    kind: np.ndarray
    targets: np.ndarray
    gen_weight: np.ndarray
    comp_weight: np.ndarray
    seg_latent_index: np.ndarray  # [s, K], positions within the unit
    seg_kind: np.ndarray
    seg_positive: np.ndarray  # local slot or -1
    seg_doc_id: np.ndarray
    num_examples: int
    seg_question: np.ndarray | None = None  # [s]: local slot of the reader's question segment, or -1

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def num_segments(self) -> int:
        return len(self.seg_kind)

    @property
    def row(self) -> Row:
        """The unit's token layout, as grc_jax/layout.py lays out every row."""
        return Row(self.tokens, self.example, self.segment, self.kind, self.seg_latent_index)


def doc_id(text: str) -> int:
    """A stable 31-bit id of a document's text: equal texts get equal ids on every host."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest(), "little") & 0x7FFFFFFF


def unit_rng(seed: int, epoch: int, record_index: int) -> np.random.Generator:
    """The generator that orders a record's reader segments in a given epoch."""
    return np.random.default_rng([seed, epoch, record_index])


_SINGLE_FIELDS = ("query", "reasoning", "positive", "question", "answer", "text")


def tokenize_records(
    records: Sequence[Record], encode_batch: Callable[[list[str]], list[list[int]]], chunk_size: int = 1024
) -> list[TokenizedRecord]:
    """Tokenizes records, a chunk of records per `encode_batch` call (which may run in parallel)."""
    out: list[TokenizedRecord] = []
    for start in range(0, len(records), chunk_size):
        chunk = records[start : start + chunk_size]
        texts = [text for record in chunk for text in _strings(record)]
        ids = iter(encode_batch(texts))
        out += [_tokenized(record, ids) for record in chunk]
    return out


def answer_text(question: str, answer: str) -> str:
    """The answer as it follows its question in running text ("Where? Quarn"): after a space.

    Tokenized on its own, "Quarn" is another token than the " Quarn" of the documents; with
    the space the reader answers with the very tokens its memories hold (and that a pretrained
    model would write after a question)."""
    if question[-1:].isspace() or answer[:1].isspace():
        return answer
    return " " + answer


def _strings(record: Record) -> list[str]:
    def text(field: str) -> str:
        value = getattr(record, field)
        return answer_text(record.question, value) if field == "answer" and record.question else value

    return [text(f) for f in _SINGLE_FIELDS if getattr(record, f) is not None] + list(record.negatives)


def _tokenized(record: Record, ids: Iterator[list[int]]) -> TokenizedRecord:
    fields = {f: list(next(ids)) for f in _SINGLE_FIELDS if getattr(record, f) is not None}
    return TokenizedRecord(
        source=record.source,
        negatives=tuple(list(next(ids)) for _ in record.negatives),
        positive_doc_id=doc_id(record.positive) if record.positive is not None else -1,
        negative_doc_ids=tuple(doc_id(n) for n in record.negatives),
        **fields,
    )


# --- one record -> one unit ----------------------------------------------------------------


def build_unit(record: TokenizedRecord, config: BuildConfig, rng: np.random.Generator) -> Unit:
    """Lays out one record; raises ValueError("{source}: why") if it cannot be trained on."""
    _check_tokens(record, config)
    layout = _Layout(config)
    query_slot = _add_query(layout, record, config) if record.query is not None else None
    positive_slot = _add_documents(layout, record, config, rng) if record.positive is not None else None
    if query_slot is not None and positive_slot is not None:
        layout.seg_positive[query_slot] = positive_slot
    if record.text is not None:
        layout.new_example()
        layout.add_reader(record.text + [config.eos_id], loss_from=1, compressive=False)
    unit = layout.finish(record.source)
    _check_fits(unit, config)
    return unit


def _check_tokens(record: TokenizedRecord, config: BuildConfig) -> None:
    fields = {f: getattr(record, f) for f in _SINGLE_FIELDS if getattr(record, f) is not None}
    fields.update({f"negatives[{i}]": n for i, n in enumerate(record.negatives)})
    latents = np.asarray(config.latent_ids)
    for name, ids in fields.items():
        if not len(ids):
            raise UserError(f"{record.source}: field '{name}' has no tokens")
        # A latent id inside text would give the model a memory slot it never computed.
        if np.isin(np.asarray(ids), latents).any():
            raise UserError(f"{record.source}: field '{name}' contains a meta latent token")
    if record.query is not None:
        size = len(record.query) + (len(record.reasoning) + 1 if record.reasoning is not None else 0)
        if size > config.max_segment_len:
            raise UserError(
                f"{record.source}: query (+ reasoning + end-of-reasoning) has {size} tokens, "
                f"more than max_segment_len {config.max_segment_len}"
            )


def _check_fits(unit: Unit, config: BuildConfig) -> None:
    if unit.length > config.row_len:
        raise UserError(f"{unit.source}: record needs {unit.length} tokens, more than row_len {config.row_len}")
    if unit.num_segments > config.max_segments_per_row:
        raise UserError(
            f"{unit.source}: record needs {unit.num_segments} segments, more than "
            f"max_segments_per_row {config.max_segments_per_row}"
        )


def _add_query(layout: "_Layout", record: TokenizedRecord, config: BuildConfig) -> int:
    layout.new_example()
    if record.reasoning is None:
        return layout.add_segment(record.query, SEG_QUERY, loss_from=None)
    text = record.query + record.reasoning + [config.eor_id]
    return layout.add_segment(text, SEG_QUERY, loss_from=len(record.query))


def _add_documents(layout: "_Layout", record: TokenizedRecord, config: BuildConfig, rng: np.random.Generator) -> int:
    """Adds the positive and negatives (and the reader, if any); returns the positive's slot."""
    P = config.max_segment_len
    # A copy of the positive, or a repeated negative, would show the reader the same memory twice.
    distinct = {i: n for n, i in zip(record.negatives, record.negative_doc_ids) if i != record.positive_doc_id}
    negatives = [(n[:P], i) for i, n in distinct.items()][: config.max_negatives]
    positive = record.positive[:P]
    shown: list[tuple[list[int], int]] = []
    if record.question is not None:
        reader = record.question + record.answer + [config.eos_id]
        loss_from = len(record.question)
        shown, negatives = negatives[: config.reader_distractors], negatives[config.reader_distractors :]
    elif config.reader_task == "reconstruction":
        reader, loss_from = [config.bos_id] + positive + [config.eos_id], 1
    elif config.reader_task == "continuation":
        half = (len(positive) + 1) // 2
        positive, rest = positive[:half], positive[half:]
        reader, loss_from = [config.bos_id] + rest + [config.eos_id], 1
    else:
        reader = None

    # The positive's memory is the one the reader needs; everything else it sees is a distractor.
    layout.new_example()
    segments = [(positive, record.positive_doc_id)] + shown
    order = rng.permutation(len(segments)) if reader is not None else range(len(segments))
    slots = {int(j): layout.add_segment(segments[j][0], SEG_DOCUMENT, loss_from=1, doc=segments[j][1]) for j in order}
    if reader is not None:
        layout.add_reader(reader, loss_from=loss_from, compressive=True)
        if record.question is not None and config.question_segments:
            layout.new_example()  # its own example: the reader must not see the question's memory
            # Cut to P as Engine cuts a question it embeds for a prior: the embedding trained is the one served.
            question = record.question[: config.max_segment_len]
            question_slot = layout.add_segment(question, SEG_QUESTION, loss_from=None)
            for slot in slots.values():
                layout.seg_question[slot] = question_slot
        if negatives:
            layout.new_example()
    for text, negative_id in negatives:
        layout.add_segment(text, SEG_DOCUMENT, loss_from=1, doc=negative_id)
    return slots[0]


class _Layout:
    """A unit's pieces in storage order: the row as grc_jax/layout.py lays it out, plus the
    losses and the per-segment fields training needs."""

    def __init__(self, config: BuildConfig):
        self.config = config
        self.row = RowBuilder(config.latent_ids, config.max_segment_len)
        self.targets: list[int] = []
        self.weights: dict[str, list[float]] = {"gen_weight": [], "comp_weight": []}
        self.seg_kind: list[int] = []
        self.seg_positive: list[int] = []
        self.seg_doc_id: list[int] = []
        self.seg_question: list[int] = []

    def new_example(self) -> None:
        self.row.new_example()

    def add_segment(self, text: list[int], seg_kind: int, loss_from: int | None, doc: int = -1) -> int:
        """Appends text and its latents as a new segment (generative loss on text[loss_from:]);
        returns its slot."""
        start = self.row.length
        slot = self.row.add_segment(text)
        self._loss(start, text, loss_from, "gen_weight")
        self.seg_kind.append(seg_kind)
        self.seg_positive.append(-1)
        self.seg_doc_id.append(doc if seg_kind == SEG_DOCUMENT else -1)
        self.seg_question.append(-1)
        return slot

    def add_reader(self, tokens: list[int], loss_from: int, compressive: bool) -> None:
        start = self.row.add_reader(tokens)
        self._loss(start, tokens, loss_from, "comp_weight" if compressive else "gen_weight")

    def _loss(self, start: int, tokens: list[int], loss_from: int | None, weight: str) -> None:
        """No loss on the tokens just laid out, but on tokens[loss_from:] of the piece at `start`."""
        grow = self.row.length - len(self.targets)
        self.targets += [0] * grow
        for column in self.weights.values():
            column += [0.0] * grow
        if loss_from is None:
            return
        # Token t of the piece is predicted at the position before it, inside the piece.
        for t in range(max(loss_from, 1), len(tokens)):
            self.targets[start + t - 1] = tokens[t]
            self.weights[weight][start + t - 1] = 1.0

    def finish(self, source: str) -> Unit:
        row = self.row.finish()
        return Unit(
            source=source,
            tokens=row.tokens,
            example=row.example,
            segment=row.segment,
            kind=row.kind,
            targets=np.asarray(self.targets, np.int32),
            **{k: np.asarray(v, np.float32) for k, v in self.weights.items()},
            seg_latent_index=row.latent_index,
            seg_kind=np.asarray(self.seg_kind, np.int32),
            seg_positive=np.asarray(self.seg_positive, np.int32),
            seg_doc_id=np.asarray(self.seg_doc_id, np.int32),
            num_examples=self.row.num_examples,
            seg_question=np.asarray(self.seg_question, np.int32),
        )


# --- units -> rows -------------------------------------------------------------------------


def plan_rows(sizes: Sequence[tuple[int, int]], row_len: int, max_segments_per_row: int) -> list[list[int]]:
    """Greedy packing of units given as (tokens, segments), in order: the indices of each row.

    A unit that does not fit in the current row starts a new one; units are never split.
    """
    rows: list[list[int]] = []
    current: list[int] = []
    tokens = segments = 0
    for i, (n, s) in enumerate(sizes):
        if n > row_len or s > max_segments_per_row:
            raise ValueError(
                f"unit {i} needs {n} tokens and {s} segments; a row holds {row_len} and {max_segments_per_row}"
            )
        if current and (tokens + n > row_len or segments + s > max_segments_per_row):
            rows.append(current)
            current, tokens, segments = [], 0, 0
        current.append(i)
        tokens += n
        segments += s
    if current:
        rows.append(current)
    return rows


def empty_batch(batch_size: int, config: BuildConfig) -> dict[str, np.ndarray]:
    """A batch of padding rows."""
    B, L, S, K = batch_size, config.row_len, config.max_segments_per_row, config.num_latents
    prior = {"seg_question": np.full((B, S), -1, np.int32)} if config.question_segments else {}
    tokens, example, segment, kind = padding((B, L), config.pad_id)
    return {
        **prior,
        "tokens": tokens,
        "example": example,
        "segment": segment,
        "kind": kind,
        "targets": np.zeros((B, L), np.int32),
        "gen_weight": np.zeros((B, L), np.float32),
        "comp_weight": np.zeros((B, L), np.float32),
        "seg_latent_index": np.zeros((B, S, K), np.int32),
        "seg_kind": np.full((B, S), SEG_UNUSED, np.int32),
        "seg_positive": np.full((B, S), -1, np.int32),
        "seg_doc_id": np.full((B, S), -1, np.int32),
    }


def rows_to_batch(rows: Sequence[Sequence[Unit]], config: BuildConfig) -> dict[str, np.ndarray]:
    """Packs each row's units side by side (`layout.join`), renumbering examples, segments and
    slots per row."""
    batch = empty_batch(len(rows), config)
    for b, units in enumerate(rows):
        row = join([unit.row for unit in units])
        at, slots = len(row.tokens), len(row.latent_index)
        if at > config.row_len or slots > config.max_segments_per_row:
            raise ValueError(f"row {b} overflows: {at} tokens, {slots} segments")
        for key in ("tokens", "example", "segment", "kind"):
            batch[key][b, :at] = getattr(row, key)
        batch["seg_latent_index"][b, :slots] = row.latent_index
        at = slots = 0
        for unit in units:
            _place(batch, b, unit, at, slots)
            at, slots = at + unit.length, slots + unit.num_segments
    return batch


def _place(batch: dict[str, np.ndarray], b: int, unit: Unit, at: int, slots: int) -> None:
    """A unit's losses and per-segment fields at its place in row b (its tokens are laid out)."""
    end, seg_end = at + unit.length, slots + unit.num_segments
    for key in ("targets", "gen_weight", "comp_weight"):
        batch[key][b, at:end] = getattr(unit, key)
    batch["seg_kind"][b, slots:seg_end] = unit.seg_kind
    batch["seg_positive"][b, slots:seg_end] = np.where(unit.seg_positive >= 0, unit.seg_positive + slots, -1)
    batch["seg_doc_id"][b, slots:seg_end] = unit.seg_doc_id
    if "seg_question" in batch and unit.seg_question is not None:
        batch["seg_question"][b, slots:seg_end] = np.where(unit.seg_question >= 0, unit.seg_question + slots, -1)


def pack_units(units: Sequence[Unit], config: BuildConfig) -> dict[str, np.ndarray]:
    """Greedily packs units, in order, into as many rows as they need."""
    plan = plan_rows([(u.length, u.num_segments) for u in units], config.row_len, config.max_segments_per_row)
    return rows_to_batch([[units[i] for i in row] for row in plan], config)
