"""`python -m grc_jax.evaluate`: metrics against hand-computed values, BEIR/QA input checks
(file:line errors), BRIGHT exclusions, GSM8K answer extraction, and the CLI end to end on a
tiny random model (its scores are meaningless; the plumbing and the outputs are the point)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from grc_jax import evaluate, hf, model
from grc_jax.config import ModelConfig
from grc_jax.data import demo_world
from grc_jax.eval import metrics
from grc_jax.eval import world as evaluation
from grc_jax.eval.data import InputError, load_beir, load_qa
from grc_jax.tokenizer import Tokenizer

L2, L3 = math.log2(3), 2.0  # log2(rank + 1) at ranks 2 and 3


# --- IR metrics ------------------------------------------------------------------------------


def test_ir_metrics_match_hand_computed_values():
    qrels = {"q1": {"d1": 1, "d3": 2, "d4": 0}, "q2": {"d2": 1}, "q3": {"d9": 1}}
    run = {
        "q1": {"d1": 0.9, "d2": 0.8, "d3": 0.7},
        "q2": {"d1": 0.5, "d2": 0.4},
        "q3": {},
        "q4": {"d1": 1.0},
    }  # q4 has no judgements: not evaluated
    got = metrics.ir_metrics(qrels, run)
    # q1: ranks d1 (rel 1), d2 (0), d3 (rel 2); trec_eval's linear gain rel / log2(rank + 1)
    ndcg_q1 = (1 / 1 + 2 / L3) / (2 / 1 + 1 / L2)
    ndcg_q2 = (1 / L2) / 1  # the one relevant document at rank 2
    # q3's relevant document is never retrieved (an empty run): 0 everywhere, still in the mean
    assert got["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2 + 0) / 3)
    assert got["recall@1"] == pytest.approx((1 / 2 + 0 + 0) / 3)
    assert got["recall@10"] == pytest.approx((1 + 1 + 0) / 3)
    assert got["recall@100"] == pytest.approx(2 / 3)
    assert got["mrr"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert set(got) == {"ndcg@10", "recall@1", "recall@10", "recall@100", "mrr"}
    with pytest.raises(ValueError, match="qrels is empty"):
        metrics.ir_metrics({}, run)


def test_rank_documents_cuts_at_depth_and_keeps_ties():
    q = np.array([[1.0, 0.0]], np.float32)
    d = np.array([[0.9, 0], [0.5, 0], [0.5, 0], [0.1, 0]], np.float32)
    run = metrics.rank_documents(q, d, ["q"], ["a", "b", "c", "d"], depth=2)
    assert run["q"] == pytest.approx({"a": 0.9, "b": 0.5, "c": 0.5})  # c ties with the 2nd: kept
    # trec_eval orders equal scores by id, descending: c before b
    assert metrics.ir_metrics({"q": {"c": 1}}, run)["recall@1"] == 0.0
    assert metrics.ir_metrics({"q": {"c": 1}}, run)["mrr"] == pytest.approx(1 / 2)


def test_excluded_documents_are_never_ranked():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((50, 8)).astype(np.float32)
    queries = docs[:5] + 0.01 * rng.standard_normal((5, 8)).astype(np.float32)  # query i's best is doc i
    doc_ids = [f"d{i}" for i in range(50)]
    query_ids = [f"q{i}" for i in range(5)]
    excluded = {"q0": ["d0", "d7", "not-in-corpus"], "q3": [f"d{i}" for i in range(50) if i != 3]}
    run = metrics.rank_documents(queries, docs, query_ids, doc_ids, excluded, depth=1000)
    assert not {"d0", "d7"} & set(run["q0"]) and len(run["q0"]) == 48
    assert list(run["q3"]) == ["d3"]
    assert max(run["q1"], key=run["q1"].get) == "d1" and len(run["q1"]) == 50
    identical = metrics.rank_documents(docs[:2], docs, ["d0", "d1"], doc_ids, ignore_identical_ids=True)
    assert "d0" not in identical["d0"] and "d1" not in identical["d1"]
    everything = {"q0": doc_ids}
    assert metrics.rank_documents(queries[:1], docs, ["q0"], doc_ids, everything) == {"q0": {}}


def test_training_time_retrieval_metrics_use_the_same_library():
    queries = np.eye(3, 4, dtype=np.float32)
    documents = np.eye(5, 4, dtype=np.float32)
    assert evaluation.retrieval_metrics(queries, documents, [0, 1, 2]) == {
        "recall@1": 1.0,
        "recall@10": 1.0,
        "ndcg@10": 1.0,
    }
    # q0 -> gold d1 and q1 -> gold d0 score 0 like three other documents: ties go by index,
    # descending (d4, d3, d2, then the gold one at rank 5); q2 -> gold d3 is third (d2, d4, d3).
    got = evaluation.retrieval_metrics(queries, documents, [1, 0, 3])
    assert got["recall@1"] == 0.0 and got["recall@10"] == 1.0
    assert got["ndcg@10"] == pytest.approx((2 / math.log2(6) + 1 / math.log2(4)) / 3)


# --- answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She sold 3 + 4 = 7 eggs.\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("It costs $1,200.00 in total.", "1200"),  # no '####': the last number
        ("first 12 then 0.50", "0.5"),
        ("#### -3 and later 9", "-3"),  # the number right after the '####' wins
        ("... #### 18\n\nQuestion: Tom has 2 apples ... #### 6", "18"),  # the first '####': the rest is invented
        ("Answer - 18", "18"),  # a dash, not a minus sign
        ("- 18 apples", "18"),
        ("The answer is 20 - 2", "2"),
        ("costs $ 5 or -$7", "-7"),
        ("version v2 gives .5", "0.5"),  # no number inside a word
        ("#### none\nso the answer is 42", "42"),  # '####' with no number: the last number
        ("no digits here", None),
        ("The answer is 18.", "18"),
    ],
)
def test_gsm8k_answer_extraction(text, expected):
    assert metrics.extract_gsm8k_answer(text) == expected


def test_gsm8k_match_and_squad_scores():
    assert metrics.gsm8k_match("so it is $18.", "Janet ... 16 - 3 - 4 = 9 * 2 = 18\n#### 18") == 1.0
    assert metrics.gsm8k_match("18.5", "#### 18") == 0.0
    assert metrics.gsm8k_match("The Owl", "owl") == 1.0  # no number in the gold: SQuAD exact match
    assert metrics.normalize_answer("  The  Quick, brown fox! ") == "quick brown fox"
    assert metrics.exact_match("an owl.", ["a cat", "Owl"]) == 1.0
    assert metrics.token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert metrics.token_f1("dog", ["cat", "dog house"]) == pytest.approx(2 / 3)
    assert metrics.token_f1("", "a") == 1.0 and metrics.token_f1("x", "the") == 0.0


# --- inputs ----------------------------------------------------------------------------------

DOCS = {
    "d1": ("Quarn", "Zorvak lives in Quarn and keeps an owl."),
    "d2": ("", "Belna is a glassblower from Ostreth."),
    "d3": (None, "The river Quarn floods every spring."),
    "d4": ("Owls", "Owls hunt at night near the river."),
}
QUERIES = {"q1": "Who keeps an owl?", "q2": "Where is Belna from?", "q3": "When does the river flood?"}


def _jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_beir(root: Path, qrels_rows=None, queries=None, excluded=None) -> Path:
    corpus = [{"_id": i, **({"title": t} if t is not None else {}), "text": x} for i, (t, x) in DOCS.items()]
    _jsonl(root / "corpus.jsonl", corpus)
    excluded = {"q1": ["d4", "N/A"]} if excluded is None else excluded
    _jsonl(
        root / "queries.jsonl",
        [
            {"_id": q, "text": t, **({"excluded_ids": excluded[q]} if q in excluded else {})}
            for q, t in (queries or QUERIES).items()
        ],
    )
    rows = qrels_rows or [("q1", "d1", 1), ("q2", "d2", 1), ("q3", "d3", 2), ("q3", "d4", 1)]
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows), encoding="utf-8"
    )
    return root


def test_load_beir_reads_the_format(tmp_path):
    data = load_beir(write_beir(tmp_path / "toy"))
    assert data.name == "toy" and data.doc_ids == ["d1", "d2", "d3", "d4"]
    assert data.doc_texts[0] == "Quarn Zorvak lives in Quarn and keeps an owl."  # title + " " + text
    assert data.doc_texts[1:3] == [DOCS["d2"][1], DOCS["d3"][1]]
    assert data.query_ids == ["q1", "q2", "q3"] and data.query_texts[2] == QUERIES["q3"]
    assert data.qrels["q3"] == {"d3": 2, "d4": 1}
    assert data.excluded == {"q1": ["d4"]}  # BRIGHT's "N/A" placeholder dropped


def _error(call) -> str:
    with pytest.raises(InputError) as info:
        call()
    return str(info.value)


def test_bad_beir_inputs_name_the_file_and_line(tmp_path):
    root = write_beir(tmp_path / "a")
    (root / "qrels" / "test.tsv").unlink()
    assert _error(lambda: load_beir(root)) == f"{root / 'qrels' / 'test.tsv'}: missing qrels file for split 'test'"

    root = write_beir(tmp_path / "b", qrels_rows=[("q1", "d1", 1), ("q2", "d9", 1)])
    assert _error(lambda: load_beir(root)) == f"{root / 'qrels' / 'test.tsv'}:3: corpus-id 'd9' is not in corpus.jsonl"

    root = write_beir(tmp_path / "c", qrels_rows=[("q7", "d1", 1)])
    assert _error(lambda: load_beir(root)) == f"{root / 'qrels' / 'test.tsv'}:2: query-id 'q7' is not in queries.jsonl"

    root = write_beir(tmp_path / "d", queries={"q1": "Who keeps an owl?", "q2": "   ", "q3": "x"})
    assert _error(lambda: load_beir(root)) == f"{root / 'queries.jsonl'}:2: query 'q2' has an empty 'text'"

    root = write_beir(tmp_path / "e", qrels_rows=[("q1", "d1", "high")])
    assert _error(lambda: load_beir(root)) == f"{root / 'qrels' / 'test.tsv'}:2: score 'high' is not an integer"

    root = write_beir(tmp_path / "f", qrels_rows=[("q1", "d4", 1)])  # d4 is excluded for q1
    assert _error(lambda: load_beir(root)) == (
        f"{root / 'qrels' / 'test.tsv'}:2: corpus-id 'd4' is relevant to query 'q1', but queries.jsonl:1 excludes it"
    )

    root = write_beir(tmp_path / "g")
    with open(root / "corpus.jsonl", "a", encoding="utf-8") as f:
        f.write('{"_id": "d5", "text": "unterminated\n')
    assert _error(lambda: load_beir(root)).startswith(f"{root / 'corpus.jsonl'}:5: invalid JSON (Unterminated string")

    root = write_beir(tmp_path / "h")
    _jsonl(root / "corpus.jsonl", [{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}])
    assert _error(lambda: load_beir(root)) == f"{root / 'corpus.jsonl'}:2: document id 'd1' repeats line 1"

    root = write_beir(tmp_path / "i", excluded={"q2": "d1"})
    assert _error(lambda: load_beir(root)) == (
        f"{root / 'queries.jsonl'}:2: 'excluded_ids' must be a list of document id strings"
    )

    root = write_beir(tmp_path / "j", qrels_rows=[("q1", "d1", 1), ("q2", "d2", 1), ("q1", "d1", 0)])
    assert _error(lambda: load_beir(root)) == (
        f"{root / 'qrels' / 'test.tsv'}:4: query 'q1' and corpus-id 'd1' are judged 1 at line 2 and 0 here"
    )
    root = write_beir(tmp_path / "j2", qrels_rows=[("q1", "d1", 1), ("q2", "d2", 1), ("q1", "d1", 1)])
    assert load_beir(root).qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}  # an identical repeat is harmless

    root = write_beir(tmp_path / "k")
    with open(root / "corpus.jsonl", "ab") as f:
        f.write(b'{"_id": "d5", "text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    assert _error(lambda: load_beir(root)) == (
        f"{root / 'corpus.jsonl'}:5: not UTF-8 (invalid continuation byte at byte 26 of the line)"
    )

    root = write_beir(tmp_path / "l")  # a byte-order mark and Windows line ends are fine
    qrels = root / "qrels" / "test.tsv"
    qrels.write_bytes(b"\xef\xbb\xbf" + qrels.read_bytes().replace(b"\n", b"\r\n"))
    assert load_beir(root).qrels["q3"] == {"d3": 2, "d4": 1}


def test_two_beir_directories_of_the_same_name_keep_their_own_figures(tmp_path):
    a, b = write_beir(tmp_path / "a" / "toy"), write_beir(tmp_path / "b" / "toy")
    args = evaluate.build_parser().parse_args([f"--hf={tmp_path}", f"--beir={a}", f"--beir={b}", f"--out={tmp_path}"])
    _, inputs = evaluate.load_inputs(args, ["retrieval"], implicit=False)
    assert [d.name for d in inputs.beir] == ["toy", "toy_2"]


def test_bad_qa_inputs_name_the_file_and_line(tmp_path):
    path = _jsonl(
        tmp_path / "qa.jsonl",
        [
            {"query": "q", "positive": "p"},  # a retrieval record: skipped
            {"question": "Who?", "answer": "Zorvak", "positive": "Zorvak is."},
            {"question": "", "answer": "x", "positive": "y"},
        ],
    )
    assert _error(lambda: load_qa(path, need_documents=True)) == f"{path}:3: record has an empty 'question'"
    assert [r.line for r in load_qa(path, need_documents=True, limit=1)] == [2]
    path = _jsonl(tmp_path / "nodoc.jsonl", [{"question": "Who?", "answer": "Zorvak"}])
    assert _error(lambda: load_qa(path, need_documents=True)) == f"{path}:1: QA record has no 'positive' field"
    assert load_qa(path, need_documents=False)[0].answers == ("Zorvak",)
    path = _jsonl(tmp_path / "noanswer.jsonl", [{"question": "Who?", "answer": ["", "x"]}])
    assert _error(lambda: load_qa(path, need_documents=False)) == (
        f"{path}:1: 'answer' must be a non-empty string or a list of them"
    )
    path = _jsonl(tmp_path / "none.jsonl", [{"query": "q"}])
    assert _error(lambda: load_qa(path, need_documents=False)) == f"{path}: no records with a 'question'"
    assert _error(lambda: load_qa(tmp_path / "missing.jsonl", need_documents=False)) == (
        f"{tmp_path / 'missing.jsonl'}: missing QA file"
    )


def test_qa_contexts_hold_the_positive_and_distinct_distractors(tmp_path):
    from grc_jax.eval.tasks import qa_contexts

    records = load_qa(
        _jsonl(
            tmp_path / "qa.jsonl",
            [
                {"question": "a?", "answer": "x", "positive": "A", "negatives": ["B", "A", "B", "C", "D", "E", "F"]},
                {"question": "b?", "answer": "x", "positive": "B"},  # no negatives: topped up from the file's documents
                {"question": "c?", "answer": "x", "positive": "C", "negatives": ["A"]},
            ],
        ),
        need_documents=True,
    )
    contexts = qa_contexts(records, num_distractors=4, seed=0)
    assert sorted(contexts[0]) == ["A", "B", "C", "D", "E"]  # its own negatives first, deduplicated
    for record, context in zip(records, contexts):
        assert record.positive in context and len(context) == len(set(context)) == 5
    assert "A" in contexts[2]
    assert qa_contexts(records, 4, seed=0) == contexts  # the same seed, the same contexts
    assert [len(c) for c in qa_contexts(records, 9, seed=0)] == [6, 6, 6]  # the file has only 6 documents


def test_cli_reports_bad_input_before_opening_the_model(tmp_path, capsys):
    root = write_beir(tmp_path / "toy", qrels_rows=[("q1", "d1", 1), ("q2", "nope", 1)])
    with pytest.raises(SystemExit) as info:
        evaluate.main([f"--hf={tmp_path / 'no-model'}", f"--beir={root}", f"--out={tmp_path / 'out'}"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {root / 'qrels' / 'test.tsv'}:3: corpus-id 'nope' is not in corpus.jsonl"
    )
    with pytest.raises(SystemExit):
        evaluate.main([f"--hf={tmp_path}", "--task=memory_qa", f"--out={tmp_path / 'out'}"])
    assert capsys.readouterr().err.strip() == "error: task memory_qa needs --qa=FILE"
    with pytest.raises(SystemExit):
        evaluate.main([f"--hf={tmp_path}", "--task=retrieval,speed", f"--beir={root}", f"--out={tmp_path / 'out'}"])
    assert "unknown task(s) ['speed']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main([f"--hf={tmp_path}", f"--beir={root}", "--latency-samples=0", f"--out={tmp_path / 'out'}"])
    assert capsys.readouterr().err.strip() == "error: --latency-samples must be >= 1, got 0"
    for flag in (
        "--page-size=0",
        "--prefill-chunk=0",
        "--num-pages=0",
        "--qa-max-new-tokens=0",
        "--max-reason-tokens=-1",
    ):
        with pytest.raises(SystemExit):
            evaluate.main([f"--hf={tmp_path}", f"--beir={root}", flag, f"--out={tmp_path / 'out'}"])
        name, value = flag.split("=")
        assert capsys.readouterr().err.strip() == f"error: {name} must be >= {1}, got {value}"
    with pytest.raises(SystemExit):
        evaluate.main([f"--hf={tmp_path}", f"--beir={root}", "--step=3", f"--out={tmp_path / 'out'}"])
    assert "--step picks a checkpoint of a training run: it goes with --checkpoint, not --hf" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints" / "4").mkdir(parents=True)
    with pytest.raises(SystemExit):
        evaluate.main([f"--checkpoint={tmp_path / 'run'}", f"--beir={root}", "--step=7", f"--out={tmp_path / 'out'}"])
    assert capsys.readouterr().err.strip() == f"error: --step=7: {tmp_path / 'run'} has checkpoints at steps [4]"


def test_bad_perplexity_text_is_reported_before_opening_the_model(tmp_path, capsys):
    def error(*flags: str) -> str:
        with pytest.raises(SystemExit) as info:
            evaluate.main([f"--hf={tmp_path / 'no-model'}", f"--out={tmp_path / 'out'}", *flags])
        assert info.value.code == 2
        return capsys.readouterr().err.strip()

    assert error(f"--text={tmp_path / 'missing.txt'}") == f"error: {tmp_path / 'missing.txt'}: missing text file"
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    assert error(f"--text={empty}") == f"error: {empty}: the text file is empty"
    lines = _jsonl(tmp_path / "texts.jsonl", [{"text": "Zorvak keeps an owl."}, {"title": "no text"}])
    assert error(f"--text={lines}") == f"error: {lines}:2: record has no 'text' field"
    latin = tmp_path / "latin.txt"
    latin.write_bytes("one line\ncaf".encode() + b"\xe9\n")
    assert error(f"--text={latin}") == (
        f"error: {latin}:2: not UTF-8 (invalid continuation byte at byte 3 of the line)"
    )
    assert error("--task=perplexity", f"--beir={tmp_path}") == "error: task perplexity needs --text=FILE"
    assert error(f"--text={lines}", "--ppl-window=1") == "error: --ppl-window must be >= 2, got 1"
    text = tmp_path / "ok.txt"
    text.write_text("Zorvak keeps an owl.", encoding="utf-8")
    _, inputs = evaluate.load_inputs(
        evaluate.build_parser().parse_args(
            [f"--hf={tmp_path}", f"--text={text}", f"--text={text}", f"--out={tmp_path}"]
        ),
        ["perplexity"],
        implicit=False,
    )
    assert inputs.texts == {"ok": ["Zorvak keeps an owl."], "ok_2": ["Zorvak keeps an owl."]}


# --- the CLI end to end ----------------------------------------------------------------------

QA = [
    {
        "positive": "Zorvak lives in Quarn and keeps an owl.",
        "negatives": ["Belna is a glassblower from Ostreth."],
        "question": "Who keeps an owl?",
        "answer": "Zorvak",
    },
    {"query": "glassblower", "positive": "Belna is a glassblower from Ostreth."},  # retrieval only: skipped
    {
        "positive": "Belna is a glassblower from Ostreth.",
        "negatives": ["The river Quarn floods every spring."],
        "question": "Where is Belna from?",
        "answer": ["Ostreth", "in Ostreth"],
    },
]
GEN = [
    {"question": "Belna has 3 owls and buys 4. How many owls?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "Zorvak has 10 owls and 2 fly away. How many?", "answer": "#### 8"},
]


@pytest.fixture(scope="module")
def tiny():
    texts = [t for _, t in DOCS.values()] + list(QUERIES.values())
    texts += [r["question"] for r in QA + GEN if "question" in r]
    tokenizer = Tokenizer(demo_world.train_tokenizer(texts * 3, vocab_size=360))
    config = ModelConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        num_latents=4,
        max_segment_len=16,
    )
    # numpy weights: init_params takes seconds to trace, and a random model needs no better
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (
            1 + 0.1 * rng.standard_normal(s.shape)
            if "norm" in jax.tree_util.keystr(path)
            else 0.3 * rng.standard_normal(s.shape)
        ).astype(s.dtype),
        model.param_shapes(config),
    )
    return config, params, tokenizer


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny) -> Path:
    config, params, tokenizer = tiny
    return hf.save_pretrained(config, params, tmp_path_factory.mktemp("model") / "export", tokenizer)


ENGINE_FLAGS = [
    "--batch-size=4",
    "--max-reason-tokens=4",
    "--num-pages=64",
    "--page-size=4",
    "--prefill-chunk=16",
    "--no-progress",
]


@pytest.mark.slow
def test_cli_end_to_end_on_a_tiny_model(tmp_path, export):
    beir = write_beir(tmp_path / "toy")
    qa = _jsonl(tmp_path / "qa.jsonl", QA)
    gen = _jsonl(tmp_path / "gsm.jsonl", GEN)
    out = tmp_path / "out"
    report = evaluate.main(
        [
            f"--hf={export}",
            f"--beir={beir}",
            f"--qa={qa}",
            f"--generation={gen}",
            f"--out={out}",
            "--task=all",
            *ENGINE_FLAGS,
            "--qa-max-new-tokens=4",
            "--gen-max-new-tokens=6",
            "--latency-samples=1",
            "--latency-tokens=3",
        ]
    )
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["tasks"] == ["retrieval", "memory_qa", "generation", "latency"]
    m = report["metrics"]
    for mode in ("plain", "reason"):
        for name in ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr"):
            assert 0.0 <= m[f"retrieval/toy/{mode}/{name}"] <= 1.0
        # 4 documents, all ranked except q1's excluded d4: every relevant one is within the top 10
        assert m[f"retrieval/toy/{mode}/recall@10"] == 1.0
        top = report["details"]["retrieval"]["toy"][f"{mode}_top10_sample"]
        assert "d4" not in top["q1"] and len(top["q1"]) == 3 and len(top["q2"]) == 4
        # The reported figures are those of the reported rankings (trec_eval: linear gains).
        judged = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 2, "d4": 1}}
        dcg = lambda gains: sum(g / math.log2(i + 2) for i, g in enumerate(gains))  # noqa: E731
        ndcg = [
            dcg([judged[q].get(d, 0) for d in top[q]]) / dcg(sorted(judged[q].values(), reverse=True)) for q in judged
        ]
        mrr = [1 / (1 + next(i for i, d in enumerate(top[q]) if d in judged[q])) for q in judged]
        assert m[f"retrieval/toy/{mode}/ndcg@10"] == pytest.approx(sum(ndcg) / 3, abs=1e-6)
        assert m[f"retrieval/toy/{mode}/mrr"] == pytest.approx(sum(mrr) / 3, abs=1e-6)
    for mode in ("memory", "full_text", "no_context"):
        assert 0.0 <= m[f"memory_qa/{mode}/exact_match"] <= m[f"memory_qa/{mode}/f1"] + 1e-9 <= 1.0 + 1e-9
    qa_details = report["details"]["memory_qa"]
    assert qa_details["questions"] == 2 and qa_details["documents"] == 3
    assert m["memory_qa/compression_ratio"] == pytest.approx(qa_details["document_tokens"] / (3 * 4))
    assert set(qa_details["samples"][0]) >= {"question", "answers", "memory", "full_text", "no_context"}
    assert 0.0 <= m["generation/gsm/exact_match"] <= 1.0
    for mode in ("no_context", "memory", "full_text"):
        assert m[f"latency/{mode}/ttft_ms"] > 0 and m[f"latency/{mode}/tokens_per_s"] > 0
    slot = report["details"]["latency"]["slot_bytes"]
    assert slot == 2 * 2 * 2 * 8 * 4  # K and V, 2 layers, 2 kv heads, head_dim 8, float32
    assert m["latency/memory/kv_bytes_total"] - m["latency/memory/kv_bytes_context"] == 3 * slot
    assert m["latency/full_text/kv_bytes_context"] > m["latency/no_context/kv_bytes_context"]
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


@pytest.mark.slow
def test_cli_reads_a_training_run_directory(tmp_path, tiny, export):
    """A run directory as grc_jax.train writes it; the report and TensorBoard carry its step.
    Same shapes as the test above, so nothing new is compiled."""
    import orbax.checkpoint as ocp

    config, params, tokenizer = tiny
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model_config.json").write_text(json.dumps(dataclasses.asdict(config)))
    tokenizer.with_latents(config.num_latents, config.vocab_size).save(run_dir / "tokenizer")
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute())
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})), force=True)
    manager.wait_until_finished()
    manager.close()
    beir = write_beir(tmp_path / "toy")
    out = tmp_path / "out"
    args = [
        f"--checkpoint={run_dir}",
        f"--beir={beir}",
        "--task=retrieval",
        "--query-modes=plain",
        f"--out={out}",
        *ENGINE_FLAGS,
    ]
    report = evaluate.main(args)
    from_hf = evaluate.main([f"--hf={export}", *args[1:4], f"--out={tmp_path / 'hf'}", *ENGINE_FLAGS])
    assert report["model_kind"] == "checkpoint" and report["step"] == 7
    assert report["metrics"] == pytest.approx(from_hf["metrics"])
    assert sorted(report["metrics"]) == sorted(
        f"retrieval/toy/plain/{k}" for k in ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr")
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("eval/retrieval/toy/plain/ndcg_at_10")
    ndcg = report["metrics"]["retrieval/toy/plain/ndcg@10"]
    assert [(e.step, e.value) for e in scalars] == [(7, pytest.approx(ndcg))]


@pytest.mark.slow
def test_cli_perplexity_is_the_library_perplexity_of_the_same_windows(tmp_path, export):
    """`--task=all` with only --text runs perplexity alone; each file's figures are
    `eval.perplexity.perplexity` of the windows `eval.perplexity.text_windows` cuts from it."""
    import types

    from grc_jax.eval.perplexity import perplexity, text_windows
    from grc_jax.inference import Engine

    story = tmp_path / "story.txt"
    story.write_text(" ".join(t for _, t in DOCS.values()) * 3, encoding="utf-8")
    lines = _jsonl(tmp_path / "lines.jsonl", [{"text": t} for t in QUERIES.values()])
    out = tmp_path / "out"
    report = evaluate.main(
        [
            f"--hf={export}",
            f"--text={story}",
            f"--text={lines}",
            f"--out={out}",
            "--task=all",
            "--ppl-window=8",
            "--ppl-max-tokens=30",
            *ENGINE_FLAGS,
        ]
    )
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["tasks"] == ["perplexity"]
    engine = Engine.from_pretrained(export)
    encoder = types.SimpleNamespace(encode=engine.tokenize)  # user text, as every engine call encodes it
    for name, documents in (("story", [story.read_text(encoding="utf-8")]), ("lines", list(QUERIES.values()))):
        windows = text_windows(encoder, documents, window=8, max_tokens=30)
        stream = engine.tokenize("\n\n".join(documents))[:30]
        assert [t for w in windows for t in w] == stream[: sum(len(w) for w in windows)]
        expected = perplexity(engine.config, engine.params, windows, batch_size=4)
        assert report["metrics"][f"perplexity/{name}/perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
        assert report["metrics"][f"perplexity/{name}/nll_per_token"] == pytest.approx(
            expected["nll_per_token"], rel=1e-6
        )
        details = report["details"]["perplexity"][name]
        assert details["tokens_scored"] == expected["tokens_scored"] == sum(len(w) - 1 for w in windows)
        assert details["windows"] == len(windows) == expected["windows"]
        assert details["documents"] == len(documents) and details["window"] == 8
    assert report["details"]["perplexity"]["story"]["windows"] == 4  # 30 tokens of a longer text: 8 + 8 + 8 + 6
    assert report["metrics"]["perplexity/story/perplexity"] > 1.0  # a random model
