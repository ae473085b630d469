"""Engine under hostile but fair use: ids from JSON, several threads, bad arguments, text that
spells reserved tokens; and the decoder's pages after a failed start."""

import threading

import jax
import numpy as np
import pytest

from grc_jax import model
from grc_jax.config import ModelConfig
from grc_jax.data import demo_world
from grc_jax.inference import Engine, MemoryBank
from grc_jax.tokenizer import Tokenizer

DOCS = [
    "Zorvak lives in Quarn and keeps an owl.",
    "Belna is a glassblower from Ostreth.",
    "The river Quarn floods every spring.",
]
QUESTIONS = ["Who keeps an owl?", "Where does Belna live?", "What floods?", "Who is Zorvak?"]


@pytest.fixture(scope="module")
def engine():
    inner = demo_world.train_tokenizer((DOCS + QUESTIONS) * 3, vocab_size=360)
    tokenizer = Tokenizer(inner)
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
    params = jax.tree.map(
        lambda x: x * 4 if x.ndim >= 2 else x, jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(0))
    )
    return Engine(
        config, params, tokenizer, num_pages=128, page_size=4, prefill_chunk=16, max_reason_tokens=6, batch_size=4
    )


@pytest.fixture
def fresh(engine):
    engine.bank = MemoryBank.for_model(engine.config, engine.params)
    return engine


# --- 4. memory ids -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "memories, named",
    [
        (["12"], "'12'"),
        ("12", "'12'"),
        ([True], "True"),
        ([[0, "1"]], "'1'"),
        ([1.0], "1.0"),
    ],
)
def test_memory_ids_that_are_not_integers_are_refused(fresh, memories, named):
    fresh.compress(DOCS)  # ids 0, 1, 2: a string "12" read digit by digit would find memories 1 and 2
    with pytest.raises(ValueError, match=rf"{named}"):
        fresh.generate(QUESTIONS[0], memories=memories, max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"{named}"):
        fresh.stream(QUESTIONS[0], memories=memories if memories != [[0, "1"]] else [0, "1"], max_new_tokens=2)


# --- 5. threads ----------------------------------------------------------------------------


def test_threads_sharing_an_engine_get_the_sequential_results_and_leave_no_page_held(fresh):
    e = fresh
    ids = e.compress(DOCS)
    free = e.decoder.allocator.num_free
    jobs = (
        [("generate", q, ids[i % 3]) for i, q in enumerate(QUESTIONS)]
        + [("stream", q, ids[(i + 1) % 3]) for i, q in enumerate(QUESTIONS[:2])]
        + [("embed", q, None) for q in QUESTIONS[:2]]
        + [("reason", QUESTIONS[3], None)]
    )

    def do(job):
        kind, text, memories = job
        if kind == "generate":
            return e.generate(text, memories=memories, max_new_tokens=5)
        if kind == "stream":
            return "".join(e.stream(text, memories=memories, max_new_tokens=5, steps_per_chunk=2))
        return e.embed(text, reason=kind == "reason").tolist()

    expected = [do(job) for job in jobs]
    results: dict[int, object] = {}
    failures: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        try:
            barrier.wait(timeout=60)
            for _ in range(2):
                results[i] = do(jobs[i])
        except BaseException as err:  # noqa: BLE001 - reported below
            failures.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    assert not failures, failures
    for i, want in enumerate(expected):
        if jobs[i][0] in ("embed", "reason"):
            np.testing.assert_allclose(results[i], want, rtol=1e-5, atol=1e-6)
        else:
            assert results[i] == want, jobs[i]
    assert e.decoder.allocator.num_free == free
    e.decoder.allocator.check()


def test_threads_compressing_at_once_each_get_their_own_memories(fresh):
    e = fresh
    texts = [f"{d} ({n})" for n in range(3) for d in DOCS]
    out: dict[int, list[int]] = {}
    threads = [
        threading.Thread(target=lambda i=i: out.__setitem__(i, e.compress(texts[i])[0])) for i in range(len(texts))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(out) == len(texts)
    assert sorted(m for ids in out.values() for m in ids) == list(range(len(e.bank)))
    for i, ids in out.items():
        assert "".join(e.bank.get(m).text for m in ids).replace(" ", "") == texts[i].replace(" ", "")


def test_a_thread_waits_for_another_thread_s_stream(fresh):
    e = fresh
    stream = e.stream(QUESTIONS[0], max_new_tokens=6, steps_per_chunk=1)
    first = next(stream)  # the stream now holds the engine
    done = threading.Event()
    other = threading.Thread(target=lambda: (e.generate(QUESTIONS[1], max_new_tokens=3), done.set()))
    other.start()
    assert not done.wait(1.0), "the other thread ran while the stream held the decoder"
    with pytest.raises(RuntimeError, match="a stream of this engine is open in this thread"):
        e.generate(QUESTIONS[1], max_new_tokens=3)
    rest = "".join(stream)
    other.join(timeout=120)
    assert done.is_set()
    assert first + rest == e.generate(QUESTIONS[0], max_new_tokens=6)


def test_a_failed_decoder_start_gives_its_pages_back(fresh):
    d = fresh.decoder
    free = d.allocator.num_free
    prompt = [fresh.tokenizer.encode(QUESTIONS[0])]
    with pytest.raises(OverflowError):
        d.start(prompt, d.settings(4), seed=2**70)
    assert d.allocator.num_free == free
    d.allocator.check()
    assert d.generate(prompt, d.settings(2))  # the pool still works


# --- weak: arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda e: e.compress([]), ValueError, "compress: no texts given"),
        (lambda e: e.embed([]), ValueError, "embed: no texts given"),
        (lambda e: e.compress(["  \n\t "]), ValueError, "text 0 is blank"),
        (lambda e: e.embed([DOCS[0], "   "]), ValueError, "text 1 is blank"),
        (lambda e: e.compress([DOCS[0], 3]), TypeError, "text 1 must be a string, got int"),
        (
            lambda e: e.generate(QUESTIONS[0], max_new_tokens=2.5),
            TypeError,
            "max_new_tokens must be an integer, got 2.5",
        ),
        (
            lambda e: e.generate(QUESTIONS[0], max_new_tokens="5"),
            TypeError,
            "max_new_tokens must be an integer, got '5'",
        ),
        (lambda e: e.generate(QUESTIONS[0], max_new_tokens=0), ValueError, "max_new_tokens must be >= 1, got 0"),
        (lambda e: e.stream(QUESTIONS[0], max_new_tokens=True), TypeError, "max_new_tokens must be an integer"),
        (lambda e: e.generate(QUESTIONS[0], seed=2**70), ValueError, "seed must be in"),
        (lambda e: e.generate(QUESTIONS[0], seed=-1), ValueError, "seed must be in"),
        (lambda e: e.generate("owl \ud800 owl"), ValueError, r"text 0 is not valid Unicode: .* at character 4"),
        (lambda e: e.compress(["ok", "x\udfff"]), ValueError, "text 1 is not valid Unicode"),
    ],
)
def test_bad_arguments_get_clear_errors_and_change_nothing(fresh, call, error, message):
    free = fresh.decoder.allocator.num_free
    with pytest.raises(error, match=message):
        call(fresh)
    assert len(fresh.bank) == 0
    assert fresh.decoder.allocator.num_free == free


# --- weak: reserved tokens in user text ----------------------------------------------------


def test_user_text_cannot_type_reserved_tokens(fresh):
    e = fresh
    text = "Zorvak </s> keeps <|mlt_0|> an owl"
    ids = e.compress([text])[0]
    assert "".join(e.bank.get(m).text for m in ids) == text  # stored as the text it was; no token vanished
    spelled = e.embed(text)
    assert not np.allclose(spelled, e.embed("Zorvak keeps an owl"), atol=1e-4)
    # a prompt that spells the eos is a prompt, and a prompt made only of it is not empty
    assert isinstance(e.generate("</s>", max_new_tokens=2), str)
    assert isinstance(e.generate("<|mlt_3|>", max_new_tokens=2), str)


def test_a_caller_may_ask_for_special_tokens_in_text(engine):
    asks = Engine(
        engine.config,
        engine.params,
        engine.tokenizer,
        num_pages=32,
        page_size=4,
        prefill_chunk=16,
        batch_size=4,
        split_special_tokens=False,
    )
    ids = asks.compress(["Zorvak </s> owl"])[0]
    assert "".join(asks.bank.get(m).text for m in ids).split() == ["Zorvak", "owl"]  # the eos read as the eos
