"""Records, the example builder, packing and the grain pipeline (docs/design.md section 4)."""

import json
import logging

import jax
import numpy as np
import pytest
import tokenizers

from grc_jax import layout
from grc_jax.data import builder, pipeline
from grc_jax.data.builder import SEG_DOCUMENT, SEG_QUERY, BuildConfig, TokenizedRecord
from grc_jax.data.records import Record, read_records
from grc_jax.layout import LATENT, READER, TEXT
from grc_jax.tokenizer import Tokenizer

BOS, EOS, EOR, PAD = 1, 2, 3, 0
L0, L1 = 90, 91  # latent ids, K = 2


def config(**overrides) -> BuildConfig:
    settings = dict(
        max_segment_len=8,
        num_latents=2,
        latent_ids=(L0, L1),
        row_len=64,
        max_segments_per_row=8,
        bos_id=BOS,
        eos_id=EOS,
        eor_id=EOR,
        pad_id=PAD,
        max_negatives=6,
        reader_distractors=4,
        reader_task="reconstruction",
    )
    return BuildConfig(**{**settings, **overrides})


def unit(record: TokenizedRecord, cfg: BuildConfig, seed: int = 0) -> builder.Unit:
    return builder.build_unit(record, cfg, np.random.default_rng(seed))


def weighted(weights: np.ndarray, targets: np.ndarray) -> dict[int, int]:
    return {int(p): int(targets[p]) for p in np.flatnonzero(weights)}


_attention_mask = jax.jit(layout.attention_mask)  # one compile per shape instead of one per op


def masks_of(batch: dict) -> np.ndarray:
    return np.asarray(_attention_mask(layout.TokenMeta(batch["example"], batch["segment"], batch["kind"])))


def check_loss_positions(batch: dict) -> None:
    """Every weighted position p predicts token p + 1, which sees p."""
    masks = masks_of(batch)
    for b, mask in enumerate(masks):
        both = batch["gen_weight"][b] * batch["comp_weight"][b]
        assert not both.any()
        for p in np.flatnonzero(batch["gen_weight"][b] + batch["comp_weight"][b]):
            assert batch["targets"][b, p] == batch["tokens"][b, p + 1]
            assert batch["example"][b, p] == batch["example"][b, p + 1] > 0
            assert mask[p + 1, p]
            assert batch["kind"][b, p] != LATENT and batch["kind"][b, p + 1] != LATENT
        assert (batch["comp_weight"][b][batch["kind"][b] != READER] == 0).all()


# --- builder: hand-made records ------------------------------------------------------------


def test_loss_targets_on_a_hand_made_record():
    record = TokenizedRecord(
        "f:1",
        query=[10, 11],
        reasoning=[12, 13],
        positive=[20, 21, 22],
        negatives=([30, 31], [40]),
        question=[50, 51],
        answer=[60],
        positive_doc_id=7,
        negative_doc_ids=(8, 9),
    )
    u = unit(record, config(reader_distractors=0))
    #          query segment + reasoning + eor   positive      reader (QA)      negatives, own example
    expected = [10, 11, 12, 13, EOR, L0, L1, 20, 21, 22, L0, L1, 50, 51, 60, EOS, 30, 31, L0, L1, 40, L0, L1]
    np.testing.assert_array_equal(u.tokens, expected)
    np.testing.assert_array_equal(u.example, [1] * 7 + [2] * 9 + [3] * 7)
    np.testing.assert_array_equal(u.segment, [1] * 7 + [2] * 5 + [0] * 4 + [3] * 4 + [4] * 3)
    T, Lt, R = TEXT, LATENT, READER
    np.testing.assert_array_equal(u.kind, [T] * 5 + [Lt] * 2 + [T] * 3 + [Lt] * 2 + [R] * 4 + [T, T, Lt, Lt, T, Lt, Lt])
    # Generative: reasoning and eor after the query; every next document token.
    assert weighted(u.gen_weight, u.targets) == {1: 12, 2: 13, 3: EOR, 7: 21, 8: 22, 16: 31}
    # Compressive: the answer and eos, predicted from the question's last token onwards.
    assert weighted(u.comp_weight, u.targets) == {13: 60, 14: EOS}
    assert u.targets[u.gen_weight + u.comp_weight == 0].sum() == 0
    np.testing.assert_array_equal(u.seg_latent_index, [[5, 6], [10, 11], [18, 19], [21, 22]])
    np.testing.assert_array_equal(u.seg_kind, [SEG_QUERY, SEG_DOCUMENT, SEG_DOCUMENT, SEG_DOCUMENT])
    np.testing.assert_array_equal(u.seg_positive, [1, -1, -1, -1])
    np.testing.assert_array_equal(u.seg_doc_id, [-1, 7, 8, 9])


def test_text_record_is_a_plain_lm_example():
    u = unit(TokenizedRecord("f:1", text=[70, 71, 72]), config())
    np.testing.assert_array_equal(u.tokens, [70, 71, 72, EOS])
    assert (u.kind == READER).all() and (u.example == 1).all() and (u.segment == 0).all()
    assert weighted(u.gen_weight, u.targets) == {0: 71, 1: 72, 2: EOS}
    assert not u.comp_weight.any() and u.num_segments == 0


def test_query_without_reasoning_has_no_loss():
    u = unit(TokenizedRecord("f:1", query=[10, 11], positive=[20, 21], positive_doc_id=5), config(reader_task="none"))
    assert not u.gen_weight[:4].any()  # the query segment and its latents
    np.testing.assert_array_equal(u.seg_positive, [1, -1])


@pytest.mark.parametrize(
    "task, segment_text, reader",
    [
        ("reconstruction", [20, 21, 22, 23, 24], [BOS, 20, 21, 22, 23, 24, EOS]),
        ("continuation", [20, 21, 22], [BOS, 23, 24, EOS]),
        ("none", [20, 21, 22, 23, 24], []),
    ],
)
def test_reader_tasks_without_question(task, segment_text, reader):
    record = TokenizedRecord(
        "f:1",
        query=[10],
        positive=[20, 21, 22, 23, 24, 25, 26, 27, 28, 29],
        negatives=([30],),
        positive_doc_id=5,
        negative_doc_ids=(6,),
    )
    u = unit(record, config(reader_task=task, max_segment_len=5))  # the positive is cut to 5 tokens
    positive = u.segment == 2
    np.testing.assert_array_equal(u.tokens[positive & (u.kind == TEXT)], segment_text)
    np.testing.assert_array_equal(u.tokens[u.kind == READER], reader)
    comp = weighted(u.comp_weight, u.targets)
    assert list(comp.values()) == reader[1:]
    if reader:  # the reader sees the positive only; the negative lies in an example of its own
        assert u.example[u.segment == 3][0] != u.example[positive][0]


def test_reader_sees_the_positive_among_the_distractors_only_through_latents():
    negatives = tuple([30 + i] * 3 for i in range(6))
    record = TokenizedRecord(
        "f:1",
        query=[10],
        positive=[20, 21, 22],
        negatives=negatives,
        question=[50],
        answer=[60, 61],
        positive_doc_id=100,
        negative_doc_ids=tuple(range(6)),
    )
    cfg = config(row_len=96, max_segments_per_row=8, reader_distractors=4)
    positive_slots = set()
    for seed in range(8):
        # A unit after a filler, so slots and positions are offset within the row.
        filler = unit(TokenizedRecord("f:0", text=[70, 71]), cfg)
        batch = builder.rows_to_batch([[filler, unit(record, cfg, seed)]], cfg)
        mask = masks_of(batch)[0]
        readers = np.flatnonzero(batch["comp_weight"][0])
        seen = mask[readers].any(0)
        assert not (seen & (batch["kind"][0] == TEXT)).any()
        slots_seen = [
            s
            for s in range(cfg.max_segments_per_row)
            if batch["seg_kind"][0, s] and seen[batch["seg_latent_index"][0, s]].all()
        ]
        slots_partly = [
            s
            for s in range(cfg.max_segments_per_row)
            if batch["seg_kind"][0, s] and seen[batch["seg_latent_index"][0, s]].any()
        ]
        assert slots_seen == slots_partly
        assert sorted(batch["seg_doc_id"][0, slots_seen]) == [0, 1, 2, 3, 100]
        query_slot = int(np.flatnonzero(batch["seg_kind"][0] == SEG_QUERY)[0])
        positive = batch["seg_positive"][0, query_slot]
        assert batch["seg_doc_id"][0, positive] == 100
        assert (batch["seg_positive"][0][np.arange(cfg.max_segments_per_row) != query_slot] == -1).all()
        positive_slots.add(slots_seen.index(positive))
        # Negatives 4 and 5 are beyond the reader's: still segments, in an example without a reader.
        rest = [s for s in range(cfg.max_segments_per_row) if batch["seg_doc_id"][0, s] in (4, 5)]
        assert len(rest) == 2
        check_loss_positions(batch)
    assert len(positive_slots) > 1  # the positive's place among the memories is shuffled


def test_distractor_order_is_deterministic_per_seed_epoch_and_record():
    record = TokenizedRecord(
        "f:1",
        positive=[20],
        negatives=tuple([30 + i] for i in range(4)),
        question=[50],
        answer=[60],
        positive_doc_id=100,
        negative_doc_ids=tuple(range(4)),
    )
    cfg = config()
    order = lambda *key: tuple(builder.build_unit(record, cfg, builder.unit_rng(*key)).seg_doc_id)  # noqa: E731
    assert order(0, 0, 3) == order(0, 0, 3)
    assert len({order(0, epoch, 3) for epoch in range(6)}) > 1


def test_copies_of_the_positive_and_repeated_negatives_are_not_shown_twice():
    record = TokenizedRecord(
        "f:1",
        positive=[20],
        negatives=([20], [30], [30], [31]),
        question=[50],
        answer=[60],
        positive_doc_id=100,
        negative_doc_ids=(100, 3, 3, 4),
    )
    u = unit(record, config(max_negatives=4, reader_distractors=4))
    assert sorted(u.seg_doc_id) == [3, 4, 100]


def test_documents_longer_than_a_segment_are_cut_with_a_warning(tmp_path, caplog):
    tok = word_tokenizer()
    cfg = pipeline_config(tok)
    long_doc = " ".join(["word"] * (cfg.max_segment_len + 5))
    path = tmp_path / "long.jsonl"
    path.write_text(
        json.dumps({"query": "q", "positive": long_doc}) + "\n" + json.dumps({"query": "q", "positive": "p"}) + "\n"
    )
    with caplog.at_level("WARNING"):
        pipeline.make_dataset([path], tok, cfg, global_batch=2, num_steps=1, seed=0)
    assert (
        f"1 of 2 records have documents longer than max_segment_len={cfg.max_segment_len} tokens (first: {path}:1)"
        in caplog.text
    )


def test_duplicate_documents_share_a_doc_id():
    records = [
        Record("f:1", query="q one", positive="the same doc"),
        Record("f:2", query="q two", positive="the same doc", negatives=("another doc",)),
    ]
    encode = lambda texts: [[10 + len(w) for w in t.split()] for t in texts]  # noqa: E731
    tokenized = builder.tokenize_records(records, encode)
    cfg = config(reader_task="none")
    batch = builder.pack_units([unit(r, cfg) for r in tokenized], cfg)
    assert len(batch["tokens"]) == 1
    doc = batch["seg_doc_id"][0]
    queries = np.flatnonzero(batch["seg_kind"][0] == SEG_QUERY)
    first, second = batch["seg_positive"][0, queries]
    assert first != second and doc[first] == doc[second] == builder.doc_id("the same doc")
    assert doc[second + 1] == builder.doc_id("another doc") != doc[first]
    assert (doc[batch["seg_kind"][0] != SEG_DOCUMENT] == -1).all()


def test_answers_are_tokenized_as_they_follow_the_question_in_text():
    # " Quarn" in a document and the answer "Quarn" after "...live?" must be the same token.
    seen = []
    encode = lambda texts: seen.extend(texts) or [[1] for _ in texts]  # noqa: E731
    builder.tokenize_records(
        [Record("f:1", positive="Ana lives in Quarn.", question="Where does Ana live?", answer="Quarn")], encode
    )
    assert seen == ["Ana lives in Quarn.", "Where does Ana live?", " Quarn"]
    assert builder.answer_text("Where? ", "Quarn") == "Quarn"
    assert builder.answer_text("Where?", " Quarn") == " Quarn"


def test_records_that_cannot_be_laid_out_name_their_source():
    cfg = config(row_len=12, max_segments_per_row=2)
    with pytest.raises(ValueError, match=r"^f:3: record needs 13 tokens, more than row_len 12"):
        unit(TokenizedRecord("f:3", text=list(range(10, 22))), cfg)
    with pytest.raises(ValueError, match=r"^f:4: record needs 3 segments, more than max_segments_per_row 2"):
        unit(
            TokenizedRecord(
                "f:4",
                query=[10],
                positive=[20],
                negatives=([30],),
                question=[5],
                answer=[6],
                positive_doc_id=1,
                negative_doc_ids=(2,),
            ),
            cfg,
        )
    with pytest.raises(ValueError, match=r"^f:5: query \(\+ reasoning \+ end-of-reasoning\) has 9 tokens"):
        unit(TokenizedRecord("f:5", query=[10] * 4, reasoning=[11] * 4, positive=[20], positive_doc_id=1), config())
    with pytest.raises(ValueError, match=r"^f:6: field 'text' contains a meta latent token"):
        unit(TokenizedRecord("f:6", text=[10, L1]), cfg)
    with pytest.raises(ValueError, match=r"^f:7: field 'negatives\[0\]' has no tokens"):
        unit(
            TokenizedRecord(
                "f:7", query=[10], positive=[20], negatives=([],), positive_doc_id=1, negative_doc_ids=(2,)
            ),
            cfg,
        )


# --- packing -------------------------------------------------------------------------------


def test_packing_keeps_units_whole_and_honours_row_len_and_segments():
    rng = np.random.default_rng(0)
    cfg = config(row_len=40, max_segments_per_row=4, reader_task="none")
    units = []
    for i in range(60):
        kind = rng.integers(3)
        if kind == 0:
            record = TokenizedRecord(f"f:{i}", text=list(rng.integers(10, 80, rng.integers(1, 30))))
        else:
            negatives = tuple([31 + j] * int(rng.integers(1, 8)) for j in range(int(rng.integers(0, 3))))
            record = TokenizedRecord(
                f"f:{i}",
                query=[10 + i],
                positive=[20] * int(rng.integers(1, 8)),
                negatives=negatives,
                positive_doc_id=i,
                negative_doc_ids=(1,) * len(negatives),
            )
        units.append(unit(record, cfg))
    sizes = [(u.length, u.num_segments) for u in units]
    plan = builder.plan_rows(sizes, cfg.row_len, cfg.max_segments_per_row)
    assert [i for row in plan for i in row] == list(range(len(units)))  # in order, each once
    for row, following in zip(plan, plan[1:] + [None]):
        tokens = sum(sizes[i][0] for i in row)
        segments = sum(sizes[i][1] for i in row)
        assert tokens <= cfg.row_len and segments <= cfg.max_segments_per_row
        if following:  # greedy: the next unit did not fit
            n, s = sizes[following[0]]
            assert tokens + n > cfg.row_len or segments + s > cfg.max_segments_per_row
    batch = builder.pack_units(units, cfg)
    assert batch["tokens"].shape == (len(plan), cfg.row_len)
    for b, row in enumerate(plan):
        # Examples of a row are its units' examples, renumbered in order, each contiguous.
        assert batch["example"][b].max() == sum(units[i].num_examples for i in row)
        used = sum(units[i].length for i in row)
        np.testing.assert_array_equal(batch["tokens"][b, :used], np.concatenate([units[i].tokens for i in row]))
        assert (batch["example"][b, used:] == 0).all() and (batch["tokens"][b, used:] == PAD).all()
        assert (batch["kind"][b, used:] == READER).all()
        for s in range(cfg.max_segments_per_row):
            if batch["seg_kind"][b, s]:
                # Slot s is the row's segment id s + 1, and its latents are where the index says.
                idx = batch["seg_latent_index"][b, s]
                assert (batch["segment"][b, idx] == s + 1).all() and (batch["kind"][b, idx] == LATENT).all()
            else:
                assert (batch["seg_latent_index"][b, s] == 0).all() and batch["seg_positive"][b, s] == -1
        for q in np.flatnonzero(batch["seg_kind"][b] == SEG_QUERY):
            p = batch["seg_positive"][b, q]
            query_token = batch["tokens"][b, batch["seg_latent_index"][b, q, 0] - 1]
            assert batch["seg_kind"][b, p] == SEG_DOCUMENT and batch["seg_doc_id"][b, p] == query_token - 10
    check_loss_positions(batch)


def test_seg_positive_survives_packing_offsets():
    cfg = config(reader_task="none", row_len=64, max_segments_per_row=9)
    records = [
        TokenizedRecord(
            f"f:{i}",
            query=[10 + i],
            positive=[20 + i],
            negatives=([40],),
            positive_doc_id=100 + i,
            negative_doc_ids=(1,),
        )
        for i in range(3)
    ]
    batch = builder.pack_units([unit(r, cfg) for r in records], cfg)
    queries = np.flatnonzero(batch["seg_kind"][0] == SEG_QUERY)
    np.testing.assert_array_equal(batch["seg_doc_id"][0, batch["seg_positive"][0, queries]], [100, 101, 102])


# --- records -------------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"query": "q", "positive": "p"})
MALFORMED = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "a JSON array, not a JSON object"),
    ('{"qeury": "q", "positive": "p"}', "unknown field 'qeury' (did you mean 'query'?)"),
    ('{"zzz": 1}', "unknown field 'zzz' (known fields: query, reasoning"),
    ('{"text": 5}', "field 'text' must be a string, got number"),
    ('{"text": "  "}', "field 'text' is empty"),
    ('{"query": "q", "positive": "p", "negatives": "n"}', "field 'negatives' must be a list of strings, got string"),
    ('{"query": "q", "positive": "p", "negatives": ["n", ""]}', "field 'negatives[1]' is empty"),
    ("{}", "empty record feeds no loss"),
    ('{"query": "q"}', "'query' without 'positive' or 'reasoning' feeds no loss"),
    ('{"positive": "p"}', "'positive' without 'query' or 'question'+'answer' feeds no loss"),
    ('{"reasoning": "r", "text": "t"}', "'reasoning' without 'query' feeds no loss"),
    ('{"positive": "p", "question": "q"}', "'question' without 'answer' feeds no loss"),
    ('{"question": "q", "answer": "a"}', "'question'+'answer' without 'positive'"),
    ('{"negatives": ["n"], "text": "t"}', "'negatives' without 'positive' feeds no loss"),
    ('{"text": "ab\\ud800"}', "field 'text' is not valid Unicode (surrogates not allowed at character 2)"),
    ('{"query": "q", "positive": "p", "negatives": ["\\udfff"]}', "field 'negatives[0]' is not valid Unicode"),
]


@pytest.mark.parametrize("line, why", MALFORMED)
def test_malformed_line_names_file_line_and_reason(tmp_path, line, why):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, "", line])
    with pytest.raises(ValueError) as error:
        read_records([path])
    assert str(error.value).startswith(f"{path}:3: {why}")


def test_non_utf8_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r":2: not UTF-8"):
        read_records(path)


def test_valid_records_and_blank_lines(tmp_path):
    lines = [
        json.dumps(
            {
                "query": "q",
                "reasoning": "r",
                "positive": "p",
                "negatives": ["a", "b"],
                "question": "x",
                "answer": "y",
                "text": "t",
            }
        ),
        "   ",
        json.dumps({"query": "q", "reasoning": "r", "answer": None}),
        json.dumps({"positive": "p", "question": "x", "answer": "y"}),
    ]
    records, skipped = read_records(write_lines(tmp_path / "d.jsonl", lines))
    assert skipped == 0 and [r.source.rsplit(":", 1)[1] for r in records] == ["1", "3", "4"]
    assert records[0] == Record(records[0].source, "q", "r", "p", ("a", "b"), "x", "y", "t")
    assert records[1].answer is None


def test_skip_malformed_counts_and_warns(tmp_path, caplog):
    lines = [GOOD] + [line for line, _ in MALFORMED] + [GOOD]
    path = write_lines(tmp_path / "d.jsonl", lines)
    with caplog.at_level(logging.WARNING):
        records, skipped = read_records([path], skip_malformed=True)
    assert len(records) == 2 and skipped == len(MALFORMED)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == len(MALFORMED) and f"{path}:2: invalid JSON" in warned[0]


# --- pipeline ------------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(40)]
K = 2


def word_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<|end_of_reasoning|>"] + WORDS)}
    inner = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    inner.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return Tokenizer(inner).with_latents(K, len(vocab))


def pipeline_config(tok: Tokenizer, **overrides) -> BuildConfig:
    settings = dict(
        max_segment_len=6,
        num_latents=K,
        latent_ids=tok.latent_ids(K),
        row_len=48,
        max_segments_per_row=6,
        bos_id=1,
        eos_id=2,
        eor_id=3,
        max_negatives=3,
        reader_distractors=2,
    )
    return BuildConfig(**{**settings, **overrides})


def synthetic_files(tmp_path, n=40, bad_lines=()):
    rng = np.random.default_rng(1)
    words = lambda lo, hi: " ".join(rng.choice(WORDS, rng.integers(lo, hi)))  # noqa: E731
    lines = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            record = {"text": words(3, 12)}
        elif kind == 1:
            record = {"query": words(1, 3), "positive": words(2, 9), "negatives": [words(2, 6) for _ in range(3)]}
        elif kind == 2:
            record = {
                "positive": words(2, 9),
                "negatives": [words(2, 6)],
                "question": words(1, 3),
                "answer": words(1, 3),
            }
        else:
            record = {
                "query": words(1, 2),
                "reasoning": words(1, 3),
                "positive": words(2, 6),
                "question": words(1, 2),
                "answer": words(1, 2),
            }
        lines.append(json.dumps(record))
    return [
        write_lines(tmp_path / "a.jsonl", lines[: n // 2] + list(bad_lines)),
        write_lines(tmp_path / "b.jsonl", lines[n // 2 :]),
    ]


def batches(dataset, count):
    return [dataset[i] for i in range(count)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_pipeline_batch_format_and_invariants(tmp_path):
    tok = word_tokenizer()
    cfg = pipeline_config(tok)
    dataset = pipeline.make_dataset(synthetic_files(tmp_path), tok, cfg, global_batch=4, num_steps=12, seed=0)
    assert len(dataset) == 12
    batch = dataset[0]
    B, L, S = 4, cfg.row_len, cfg.max_segments_per_row
    shapes = {
        "tokens": (B, L),
        "example": (B, L),
        "segment": (B, L),
        "kind": (B, L),
        "targets": (B, L),
        "gen_weight": (B, L),
        "comp_weight": (B, L),
        "seg_latent_index": (B, S, K),
        "seg_kind": (B, S),
        "seg_positive": (B, S),
        "seg_doc_id": (B, S),
    }
    assert {k: v.shape for k, v in batch.items()} == shapes
    for key, value in batch.items():
        assert value.dtype == (np.float32 if key.endswith("weight") else np.int32), key
    for i in range(len(dataset)):
        check_loss_positions(dataset[i])
    assert batch["gen_weight"].any() and batch["comp_weight"].any() and (batch["seg_kind"] == SEG_QUERY).any()


def test_host_shards_concatenate_to_the_global_batch(tmp_path):
    tok = word_tokenizer()
    cfg = pipeline_config(tok)
    files = synthetic_files(tmp_path)
    kwargs = dict(global_batch=4, num_steps=5, seed=3)
    whole = pipeline.make_dataset(files, tok, cfg, **kwargs)
    hosts = [pipeline.make_dataset(files, tok, cfg, block=h, blocks=2, **kwargs) for h in range(2)]
    for step in range(5):
        joined = {k: np.concatenate([hosts[0][step][k], hosts[1][step][k]]) for k in whole[step]}
        assert_batches_equal([joined], [whole[step]])
    with pytest.raises(ValueError, match="global_batch 4 does not split into 3 host blocks"):
        pipeline.make_dataset(files, tok, cfg, block=0, blocks=3, **kwargs)


def test_same_seed_same_batches_other_seed_other_batches(tmp_path):
    tok = word_tokenizer()
    cfg = pipeline_config(tok)
    files = synthetic_files(tmp_path)

    def make(seed):
        return batches(pipeline.make_dataset(files, tok, cfg, global_batch=4, num_steps=4, seed=seed), 4)

    assert_batches_equal(make(0), make(0))
    with pytest.raises(AssertionError):
        assert_batches_equal(make(0), make(1))


def test_epochs_reshuffle(tmp_path):
    tok = word_tokenizer()
    cfg = pipeline_config(tok)
    records, _ = read_records(synthetic_files(tmp_path))
    tokenized = builder.tokenize_records(records, tok.encode_batch)
    plan = pipeline.plan_packing(tokenized, cfg, num_rows=60, seed=0)
    assert plan.epochs >= 3
    orders = [[i for epoch, row in plan.rows if epoch == e for i in row] for e in range(2)]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(len(tokenized)))  # every record once per epoch
    assert orders[0] != orders[1]
    assert 0.0 <= plan.padding_fraction < 1.0


def test_iterator_resumes_at_the_next_batch(tmp_path):
    tok = word_tokenizer()
    dataset = pipeline.make_dataset(
        synthetic_files(tmp_path), tok, pipeline_config(tok), global_batch=2, num_steps=8, seed=0
    )
    iterator = pipeline.make_iterator(dataset)
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(2)]
    resumed = pipeline.make_iterator(dataset)
    resumed.set_state(state)
    assert_batches_equal([next(resumed) for _ in range(2)], expected)
    assert_batches_equal(expected, [dataset[3], dataset[4]])


def test_pipeline_skip_malformed_counts_lines_and_oversized_records(tmp_path, caplog):
    tok = word_tokenizer()
    cfg = pipeline_config(tok)
    oversized = json.dumps({"text": " ".join(["w1"] * 60)})
    files = synthetic_files(tmp_path, bad_lines=["{oops", oversized])
    with pytest.raises(ValueError, match=r"a\.jsonl:21: invalid JSON"):
        pipeline.make_dataset(files, tok, cfg, global_batch=2, num_steps=2, seed=0)
    records, _ = read_records(files, skip_malformed=True)
    with pytest.raises(ValueError, match=r"a\.jsonl:22: record needs 61 tokens, more than row_len 48"):
        pipeline.plan_packing(builder.tokenize_records(records, tok.encode_batch), cfg, num_rows=2, seed=0)
    with caplog.at_level(logging.INFO):
        dataset = pipeline.make_dataset(files, tok, cfg, global_batch=2, num_steps=2, seed=0, skip_malformed=True)
    assert len(dataset) == 2
    assert any("skipped 1 malformed line(s) and 1 record(s)" in r.getMessage() for r in caplog.records)


def test_demo_world_end_to_end(tmp_path):
    demo_world = pytest.importorskip("grc_jax.data.demo_world")
    demo_world.write_demo_world(str(tmp_path), seed=0, num_entities=24, num_heldout=6)
    tok = Tokenizer.from_dir(tmp_path)
    tok = tok.with_latents(4, len(tok))
    cfg = BuildConfig(
        max_segment_len=96,
        num_latents=4,
        latent_ids=tok.latent_ids(4),
        row_len=1024,
        max_segments_per_row=12,
        bos_id=tok.token_to_id("<s>"),
        eos_id=tok.token_to_id("</s>"),
        eor_id=tok.token_to_id("<|end_of_reasoning|>"),
        pad_id=tok.token_to_id("<pad>"),
    )
    dataset = pipeline.make_dataset(tmp_path / "train.jsonl", tok, cfg, global_batch=4, num_steps=3, seed=0)
    for i in range(3):
        batch = dataset[i]
        check_loss_positions(batch)
        queries = batch["seg_kind"] == SEG_QUERY
        assert (
            batch["seg_kind"][np.arange(4)[:, None], np.maximum(batch["seg_positive"], 0)][
                queries & (batch["seg_positive"] >= 0)
            ]
            == SEG_DOCUMENT
        ).all()
