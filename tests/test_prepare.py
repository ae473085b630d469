"""python -m grc_jax.data.prepare: each upstream layout converted record by record, chunking,
mined negatives, the report, and a clear one-line error for input in another layout."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from grc_jax.data import demo_world, records
from grc_jax.data.chunking import Chunker
from grc_jax.data.prepare import main, prepare
from grc_jax.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


def run(fmt, source, out, **options):
    report = prepare(fmt, source, out, **options)
    lines = (Path(out) / "records.jsonl").read_text().splitlines()
    assert json.loads((Path(out) / "report.json").read_text()) == report
    assert report["records_written"] == len(lines)
    records.read_records([Path(out) / "records.jsonl"])  # training reads them as they are
    return [json.loads(line) for line in lines], report


def skips(report):
    return {reason: (s["count"], s["examples"]) for reason, s in report["skipped"].items()}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE trained on the fixtures' text: several tokens per word."""
    texts = [p.read_text() for p in DATA.rglob("*") if p.is_file()]
    out = tmp_path_factory.mktemp("tokenizer")
    Tokenizer(demo_world.train_tokenizer(texts * 2, vocab_size=320)).save(out)
    return out


# --- BEIR ------------------------------------------------------------------------------------

SOLAR = "Solar power\nSolar panels turn sunlight into electricity for homes."
SOLAR_HEAT = "Solar heating\nSolar water heaters warm water with sunlight on the roof."
TEA = "Tea\nGreen tea is brewed from the leaves of Camellia sinensis."
COFFEE = "Coffee\nCoffee beans are roasted seeds of the coffee plant."
WIND = "Wind\nWind turbines convert the wind into electricity."


def test_beir_one_record_per_relevant_document(tmp_path):
    out, report = run("beir", DATA / "beir", tmp_path, max_segment_len=12, negatives=2)
    assert out == [
        {"query": "how do solar panels make electricity", "positive": SOLAR, "negatives": [SOLAR_HEAT]},  # judged 0
        {"query": "drinks brewed from a plant", "positive": TEA},
        {"query": "drinks brewed from a plant", "positive": COFFEE},
        # the 31-word document in 12-word chunks: the one sharing most words with the query
        {
            "query": "which river carries the most water",
            "positive": "longest rivers on Earth. The Amazon carries more water than any other",
        },
    ]
    assert skips(report) == {"no relevant document in qrels": (1, [f"{DATA}/beir/qrels/train.tsv:6"])}
    test, _ = run("beir", DATA / "beir", tmp_path / "test", max_segment_len=12, split="test")
    assert test == [{"query": "wind energy", "positive": WIND}]


def test_beir_bm25_mining_skips_the_querys_relevant_documents(tmp_path):
    out, report = run("beir", DATA / "beir", tmp_path, max_segment_len=12, negatives=2, mine="bm25")
    # q1 shares "electricity" with the wind document; q2's only matches are its own two relevant
    # documents; q4's chunks are all relevant, "water" finds the solar heater.
    assert [r.get("negatives", []) for r in out] == [[SOLAR_HEAT, WIND], [], [], [SOLAR_HEAT]]
    assert report["mined_negatives"] == 2 and report["negatives_per_record"] == {"0": 2, "1": 1, "2": 1}


# --- MS MARCO and sentence-transformers triplets ------------------------------------------------

TRIPLES = [
    {
        "query": "what is the capital of france",
        "positive": "Paris is the capital and largest city of France.",
        "negatives": ["Berlin is the capital of Germany.", "Madrid is the capital of Spain."],
    },
    {
        "query": "how many legs does a spider have",
        "positive": "Spiders have eight legs and two body segments.",
        "negatives": ["Insects have six legs."],
    },
]


def test_msmarco_tsv_groups_a_querys_negatives(tmp_path):
    out, _ = run("msmarco", DATA / "msmarco" / "triples.tsv", tmp_path)
    assert out == TRIPLES
    capped, _ = run("msmarco", DATA / "msmarco" / "triples.tsv", tmp_path / "one", negatives=1)
    assert [len(r["negatives"]) for r in capped] == [1, 1]


def test_msmarco_sentence_transformers_jsonl(tmp_path):
    out, _ = run("msmarco", DATA / "msmarco" / "triplets.jsonl", tmp_path)
    assert out == [
        {
            "query": "what do bees make",
            "positive": "Honey bees make honey from the nectar of flowers.",
            "negatives": ["Wasps do not make honey.", "Ants build nests underground."],
        },
        {
            "query": "how hot is the sun",
            "positive": "The surface of the Sun is about 5500 degrees Celsius.",
            "negatives": ["The Moon has no atmosphere."],
        },
    ]


def test_msmarco_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="Parquet needs the data extra (pyarrow)")
    import pyarrow.parquet as pq

    rows = [
        {"query": q, "positive": p, "negative": n}
        for q, p, n in [
            (TRIPLES[0]["query"], TRIPLES[0]["positive"], TRIPLES[0]["negatives"][0]),
            (TRIPLES[0]["query"], TRIPLES[0]["positive"], TRIPLES[0]["negatives"][1]),
            (TRIPLES[1]["query"], TRIPLES[1]["positive"], TRIPLES[1]["negatives"][0]),
        ]
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "triplets.parquet")
    out, _ = run("msmarco", tmp_path / "triplets.parquet", tmp_path / "out")
    assert out == TRIPLES


def test_msmarco_pairs_get_bm25_negatives(tmp_path):
    out, report = run("msmarco", DATA / "msmarco" / "pairs.jsonl", tmp_path, negatives=1, mine="bm25")
    assert out == [
        {
            "query": "what do bees make",
            "positive": "Honey bees make honey from the nectar of flowers.",
            "negatives": ["Wasps eat insects and nectar, and do not make honey."],
        },  # shares "make"
        {"query": "where are ants found", "positive": "Ants build nests underground."},  # nothing shares a word
        {"query": "what do wasps eat", "positive": "Wasps eat insects and nectar, and do not make honey."},
    ]
    assert report["mined_negatives"] == 1


# --- SQuAD ---------------------------------------------------------------------------------

ETNA = "Mount Etna is an active volcano on the east coast of Sicily."
VESUVIUS = "Vesuvius destroyed Pompeii in the year 79."
KRAKATOA = "Krakatoa erupted violently in 1883."


def test_squad_v2_answer_holding_chunks_and_skips(tmp_path):
    out, report = run("squad", DATA / "squad" / "dev-v2.0.json", tmp_path, max_segment_len=12, negatives=2)
    # The Etna paragraph has 30 words: chunks of 12, 12 and 6 words.
    assert out == [
        {"positive": ETNA, "negatives": [VESUVIUS, KRAKATOA], "question": "Where is Mount Etna?", "answer": "Sicily"},
        {
            "positive": "recent large eruption began in 2021.",
            "negatives": [VESUVIUS, KRAKATOA],
            "question": "When did the recent large eruption begin?",
            "answer": "2021",
        },
        # the answer straddles chunks 2 and 3: a 12-word window around it
        {
            "positive": "active volcanoes in Europe. Its most recent large eruption began in 2021.",
            "negatives": [VESUVIUS, KRAKATOA],
            "question": "What began in 2021?",
            "answer": "Its most recent large eruption",
        },
        # answer_start 0 is wrong: the answer is found by its text
        {
            "positive": VESUVIUS,
            "negatives": [ETNA, KRAKATOA],
            "question": "Which city did Vesuvius destroy?",
            "answer": "Pompeii",
        },
        {"positive": "Tea originated in China.", "question": "Where did tea originate?", "answer": "China"},
    ]
    source = f"{DATA}/squad/dev-v2.0.json"
    assert skips(report) == {
        "unanswerable": (1, [f"{source}:data[0].paragraphs[0].qas[3]"]),
        "answer not in its paragraph": (1, [f"{source}:data[0].paragraphs[2].qas[0]"]),
    }


def test_squad_v1_other_paragraphs_are_negatives(tmp_path):
    out, _ = run("squad", DATA / "squad" / "train-v1.1.json", tmp_path)
    assert out == [
        {
            "positive": "Tea originated in China.",
            "negatives": ["Black tea is fully oxidised."],
            "question": "Where did tea originate?",
            "answer": "China",
        },
        {
            "positive": "Black tea is fully oxidised.",
            "negatives": ["Tea originated in China."],
            "question": "Which tea is fully oxidised?",
            "answer": "Black tea",
        },
    ]


def test_squad_chunks_with_the_models_tokenizer(tmp_path, tokenizer_dir):
    P = 16
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    out, report = run("squad", DATA / "squad" / "dev-v2.0.json", tmp_path, tokenizer=tokenizer_dir, max_segment_len=P)
    assert report["length_unit"] == "tokens" and report["lengths"]["positive"]["max"] <= P
    chunker = Chunker(tokenizer, P)
    contexts = [
        p["context"]
        for a in json.loads((DATA / "squad" / "dev-v2.0.json").read_text())["data"]
        for p in a["paragraphs"]
    ]
    etna = contexts[0]
    assert len(tokenizer.encode(etna)) > 2 * P and len(chunker.chunks(etna)) >= 3
    for record in out:
        assert len(tokenizer.encode(record["positive"])) <= P
        assert record["answer"] in record["positive"]
        assert any(record["positive"] in c for c in contexts)
        for negative in record.get("negatives", []):
            assert len(tokenizer.encode(negative)) <= P
    # the straddling answer is too long here
    assert [r["answer"] for r in out] == ["Sicily", "2021", "Pompeii", "China"]
    # an answer inside one chunk gets that very chunk
    assert out[0]["positive"] == next(c for c in chunker.chunks(etna) if "Sicily" in c)


def test_chunks_cover_the_text_in_order_within_P_tokens(tokenizer_dir):
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    text = (DATA / "text" / "essay.txt").read_text() * 3
    for P in (5, 9, 16):
        chunks = Chunker(tokenizer, P).chunks(text)
        assert all(len(tokenizer.encode(c)) <= P for c in chunks)
        assert "".join("".join(c.split()) for c in chunks) == "".join(text.split())  # all of it, once, in order
        at = 0
        for c in chunks:
            at = text.index(c, at) + len(c)
            assert c == c.strip() and (P < 16 or at == len(text) or text[at].isspace())  # between words


# --- HotpotQA, NQ, text --------------------------------------------------------------------

BLUE = "Blue River\nBlue River is a film from 1990. It was directed by Ann Lee."
ANN = "Ann Lee\nAnn Lee is a director born in Oslo."
ALPHA = (
    "Alpha Bridge\nThe Alpha Bridge is a stone arch bridge that crosses the Green River in the old town. It was "
    "completed in 1820 after eleven years of work by local masons and carpenters."
)
BETA = (
    "Beta Tower\nThe Beta Tower is a steel observation tower that stands on a hill above the harbour. It was "
    "opened to visitors in 1901 and is still the tallest building in the region."
)


def test_hotpotqa_gold_paragraphs_joined_or_one_record_per_hop(tmp_path):
    out, report = run("hotpotqa", DATA / "hotpotqa" / "dev_distractor.json", tmp_path, max_segment_len=40, negatives=2)
    older = "Which is older, the Alpha Bridge or the Beta Tower?"
    assert out == [
        # both gold paragraphs fit in P=40 words: one positive, the reader sees both hops
        {
            "query": "Where was the director of Blue River born?",
            "reasoning": "It was directed by Ann Lee. Ann Lee is a director born in Oslo.",
            "positive": f"{BLUE}\n\n{ANN}",
            "negatives": ["Red Hill\nRed Hill is a 1985 film.", "Bob Stone\nBob Stone was born in Rome."],
            "question": "Where was the director of Blue River born?",
            "answer": "Oslo",
        },
        # 33 + 34 words do not: one record per gold paragraph, question+answer only where the answer is;
        # query + the 31-word reasoning exceed P, so the reasoning is dropped
        {
            "query": older,
            "positive": ALPHA,
            "negatives": ["Gamma Hall\nGamma Hall is a concert hall."],
            "question": older,
            "answer": "Alpha Bridge",
        },
        {"query": older, "positive": BETA, "negatives": ["Gamma Hall\nGamma Hall is a concert hall."]},
    ]
    assert skips(report) == {"empty question or answer": (1, [f"{DATA}/hotpotqa/dev_distractor.json:[2]"])}
    assert report["notes"] == {
        "query + reasoning longer than P tokens (reasoning dropped)": 1,
        "supporting fact past its paragraph's end (left out of the reasoning)": 1,
    }
    roomy, _ = run("hotpotqa", DATA / "hotpotqa" / "dev_distractor.json", tmp_path / "roomy", max_segment_len=80)
    assert roomy[1]["positive"] == f"{ALPHA}\n\n{BETA}" and len(roomy) == 2
    assert roomy[1]["reasoning"].startswith("It was completed in 1820")


def test_nq_dpr_layout(tmp_path):
    out, report = run("nq", DATA / "nq" / "nq-dev.json", tmp_path, max_segment_len=12, negatives=2)
    assert out == [
        {
            "query": "who wrote the novel moby dick",
            "positive": "Moby-Dick\nMoby-Dick is an 1851 novel by American writer Herman Melville.",
            "negatives": [
                "Billy Budd\nBilly Budd is a novella left unfinished at his death.",
                "Whale\nWhales are large marine mammals.",
            ],  # hard negatives first
            "question": "who wrote the novel moby dick",
            "answer": "Herman Melville",
        },
        # 29 words in chunks of 12: the chunk with the answer
        {
            "query": "when did the eiffel tower open",
            "positive": "1889 for the World's Fair.",
            "question": "when did the eiffel tower open",
            "answer": "1889",
        },
        {
            "query": "who was the first man on the moon",
            "positive": "Apollo 11\nApollo 11 landed on the Moon in July 1969.",
        },
    ]
    assert skips(report) == {"no positive passage": (1, [f"{DATA}/nq/nq-dev.json:[1]"])}
    assert report["notes"] == {"no answer in the positive passage (record without question/answer)": 1}


def test_text_files_and_jsonl_are_chunked(tmp_path):
    out, report = run("text", DATA / "text", tmp_path, max_segment_len=12)
    assert out == [
        {"text": "Rivers shape the land they cross.\nOver thousands of years they carve"},
        {"text": "valleys and canyons,\ncarry sand to the sea, and build deltas at"},
        {"text": "their mouths.\n\nFloods spread fertile silt over the plains."},
    ]
    jsonl, report = run(
        "text", DATA / "text" / "notes.jsonl", tmp_path / "jsonl", max_segment_len=12, text_field="body"
    )
    assert jsonl == [
        {"text": "Tides rise and fall twice a day."},
        {"text": "The Moon's pull on the oceans causes the tides, and the Sun"},
        {"text": "adds a smaller pull of its own."},
    ]
    assert skips(report) == {"empty document": (1, [f"{DATA}/text/notes.jsonl:2"])}


def test_model_mining_ranks_by_the_runs_embeddings(tmp_path, tokenizer_dir):
    import jax

    from grc_jax import hf, model
    from grc_jax.config import ModelConfig
    from grc_jax.inference.engine import Engine

    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    config = ModelConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        num_latents=2,
        max_segment_len=32,
    )
    hf.save_pretrained(config, model.init_params(config, jax.random.key(0)), tmp_path / "run", tokenizer)
    out, report = run(
        "msmarco", DATA / "msmarco" / "pairs.jsonl", tmp_path / "out", negatives=1, mine=f"model:{tmp_path / 'run'}"
    )
    engine = Engine.from_pretrained(tmp_path / "run")
    pairs = [json.loads(line) for line in (DATA / "msmarco" / "pairs.jsonl").read_text().splitlines()]
    corpus = [p["positive"] for p in pairs]
    sims = np.asarray(engine.encode_query([p["query"] for p in pairs])) @ np.asarray(engine.encode_document(corpus)).T
    for i, record in enumerate(out):
        best = next(j for j in np.argsort(-sims[i], kind="stable") if j != i)  # never its own positive
        assert record["negatives"] == [corpus[best]]
    assert report["mined_negatives"] == 3 and report["mine"] == f"model:{tmp_path / 'run'}"


# --- report, output formats, CLI -------------------------------------------------------------


def test_report_counts_and_histograms(tmp_path, tokenizer_dir):
    _, report = run("squad", DATA / "squad" / "dev-v2.0.json", tmp_path, tokenizer=tokenizer_dir, max_segment_len=16)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    out = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    for field in ("positive", "question", "answer"):
        lengths = [len(tokenizer.encode(r[field])) for r in out]
        h = report["lengths"][field]
        assert (h["count"], h["max"]) == (len(out), max(lengths)) and sum(h["histogram"].values()) == len(out)
    # this tokenizer cuts "Its most recent large eruption" into more than 16 tokens: that question is skipped
    assert report["negatives_per_record"] == {"0": 1, "2": 3} and report["records_written"] == 4
    assert {k: v[0] for k, v in skips(report).items()} == {
        "answer longer than a chunk": 1,
        "unanswerable": 1,
        "answer not in its paragraph": 1,
    }


def test_arrayrecord_output_holds_the_jsonl_records(tmp_path):
    from array_record.python import array_record_module

    prepare("squad", DATA / "squad" / "dev-v2.0.json", tmp_path / "jsonl", max_segment_len=12)
    report = prepare(
        "squad",
        DATA / "squad" / "dev-v2.0.json",
        tmp_path / "ar",
        max_segment_len=12,
        format_out="arrayrecord",
        records_per_shard=2,
    )
    assert [Path(f).name for f in report["files"]] == [f"records-0000{i}-of-00003.arrayrecord" for i in range(3)]
    stored = []
    for f in report["files"]:
        reader = array_record_module.ArrayRecordReader(f)
        stored += reader.read_all()
        reader.close()
    assert [s.decode() for s in stored] == (tmp_path / "jsonl" / "records.jsonl").read_text().splitlines()


def test_cli_prints_the_report(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grc_jax.data.prepare",
            "squad",
            f"--input={DATA / 'squad' / 'dev-v2.0.json'}",
            f"--out={tmp_path}",
            "--max-segment-len=12",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "5 records written to" in proc.stdout and "skipped 1: unanswerable (e.g. " in proc.stdout
    assert "negatives per record: 0:1 2:4" in proc.stdout and (tmp_path / "report.json").is_file()


def _write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def _beir(tmp_path: Path, corpus: str, queries: str, qrels: str) -> Path:
    _write(tmp_path, "beir/corpus.jsonl", corpus)
    _write(tmp_path, "beir/queries.jsonl", queries)
    _write(tmp_path, "beir/qrels/train.tsv", qrels)
    return tmp_path / "beir"


DOC = '{"_id": "d1", "title": "", "text": "A document."}\n'
QUERY = '{"_id": "q1", "text": "a query"}\n'
BAD = [
    (
        "beir",
        lambda t: _beir(t, DOC + '{"_id": "d2", "title": "x"}\n', QUERY, "q1\td1\t1\n"),
        r"beir/corpus.jsonl:2: missing key 'text'; expected a corpus.jsonl line",
    ),
    (
        "beir",
        lambda t: _beir(t, DOC, QUERY, "query-id\tcorpus-id\tscore\nq1\td1\n"),
        r"beir/qrels/train.tsv:2: 2 tab-separated columns; expected a qrels line",
    ),
    (
        "beir",
        lambda t: _beir(t, DOC, QUERY, "q1\td9\t1\n"),
        r"beir/qrels/train.tsv:1: corpus id 'd9' is not in corpus.jsonl",
    ),
    (
        "beir",
        lambda t: _beir(t, DOC, "[1, 2]\n", "q1\td1\t1\n"),
        r"beir/queries.jsonl:1: a JSON array, not a JSON object; expected a queries",
    ),
    ("beir", lambda t: _write(t, "beir/corpus.jsonl", DOC).parent, r"beir/queries.jsonl: no such file; expected"),
    (
        "msmarco",
        lambda t: _write(t, "t.tsv", "q\tp\tn\nq\tp\tn\tm\n"),
        r"t.tsv:2: 4 tab-separated columns; expected query<TAB>positive",
    ),
    (
        "msmarco",
        lambda t: _write(t, "t.jsonl", '{"query": "q", "pos": "p"}\n'),
        r"t.jsonl:1: no text column 'positive' \(columns: query, pos\); expected a 'query'",
    ),
    (
        "msmarco",
        lambda t: _write(t, "t.jsonl", '{"query": "q", "positive": "p", "negative": 3}\n'),
        r"t.jsonl:1: a negative is a int; expected text",
    ),
    ("msmarco", lambda t: _write(t, "t.parquet", "not parquet"), r"t.parquet: not a Parquet file"),
    ("squad", lambda t: _write(t, "s.json", '{"version": "v2.0"}'), r"s.json: missing key 'data'; expected SQuAD JSON"),
    (
        "squad",
        lambda t: _write(t, "s.json", '{"data": [{"paragraphs": [{"context": "c", "qas": [{"answers": []}]}]}]}'),
        r"s.json:data\[0\].paragraphs\[0\].qas\[0\]: missing key 'question'",
    ),
    (
        "squad",
        lambda t: _write(
            t,
            "s.json",
            '{"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q", '
            '"answers": [{"text": "c", "answer_start": "0"}]}]}]}]}',
        ),
        r"s.json:data\[0\].paragraphs\[0\].qas\[0\].answers\[0\].answer_start: a str, expected SQuAD JSON",
    ),
    ("squad", lambda t: _write(t, "s.json", '{"data": [\n{"paragraphs": }]}'), r"s.json:2: invalid JSON"),
    ("hotpotqa", lambda t: _write(t, "h.json", '{"question": "q"}'), r"h.json: a JSON dict; expected HotpotQA JSON"),
    (
        "hotpotqa",
        lambda t: _write(
            t,
            "h.json",
            '[{"question": "q", "answer": "a", "supporting_facts": [], "context": [["T", "one sentence"]]}]',
        ),
        r"h.json:\[0\].context\[0\]\[1\]: a str, expected \[title, \[sentences\]\]",
    ),
    (
        "hotpotqa",
        lambda t: _write(
            t, "h.json", '[{"question": "q", "answer": "a", "supporting_facts": [["U", 0]], "context": [["T", ["s"]]]}]'
        ),
        r"h.json:\[0\].supporting_facts\[0\]: title 'U' is not in the example's context",
    ),
    (
        "nq",
        lambda t: _write(t, "n.json", '[{"answers": ["a"], "positive_ctxs": []}]'),
        r"n.json:\[0\]: missing key 'question'",
    ),
    (
        "nq",
        lambda t: _write(t, "n.json", '[{"question": "q", "answers": ["a"], "positive_ctxs": [{"title": "t"}]}]'),
        r"n.json:\[0\].positive_ctxs\[0\]: missing key 'text'",
    ),
    (
        "text",
        lambda t: _write(t, "x.jsonl", '{"body": "b"}\n'),
        r"x.jsonl:1: missing key 'text'; expected a JSON object with a text field 'text' "
        r"\(choose it with --text-field\)",
    ),
    (
        "records",
        lambda t: _write(t, "r.jsonl", '{"text": "ok"}\n{"query": "q", "positive": 3}\n'),
        r"r.jsonl:2: field 'positive' must be a string, got number; expected a GRC record",
    ),
]


@pytest.mark.parametrize("fmt, make, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_format_is_one_line_naming_file_and_place(tmp_path, capsys, fmt, make, message):
    source = make(tmp_path)
    assert main([fmt, f"--input={source}", f"--out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare: error: ") and err.count("\n") == 1, err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out" / "records.jsonl").exists()


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--max-segment-len=0", "--max-segment-len must be >= 1, got 0"),
        ("--negatives=-1", "--negatives must be >= 0, got -1"),
        ("--mine=tfidf", "--mine must be bm25 or model:RUN_DIR, got 'tfidf'"),
    ],
)
def test_bad_option_is_one_line(tmp_path, capsys, flag, message):
    assert main(["text", f"--input={DATA / 'text'}", f"--out={tmp_path}", flag]) == 2
    assert capsys.readouterr().err == f"prepare: error: {message}\n"


def test_bad_format_from_the_cli_has_no_traceback(tmp_path):
    bad = _write(tmp_path, "t.tsv", "only one column\n")
    proc = subprocess.run(
        [sys.executable, "-m", "grc_jax.data.prepare", "msmarco", f"--input={bad}", f"--out={tmp_path / 'out'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"prepare: error: {bad}:1: 1 tab-separated columns; expected query<TAB>positive[<TAB>negative]\n"
    )
