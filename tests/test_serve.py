"""`python -m grc_jax.serve` against the official `openai` client over loopback, on a tiny model:
the OpenAI routes, the memory routes, continuous batching (concurrent greedy requests give the
one-at-a-time outputs; a short request is not held behind a long one), kill -9 and SIGTERM with
a durable bank, bad input, auth; and MemoryBank's load checks and bank directories."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jax
import ml_dtypes
import numpy as np
import openai
import pytest
import uvicorn

from grc_jax import hf, model
from grc_jax.config import ModelConfig
from grc_jax.data import demo_world
from grc_jax.inference import BankSpec, Engine, MemoryBank
from grc_jax.serve import Worker, create_app
from grc_jax.serve.app import render_messages
from grc_jax.tokenizer import Tokenizer

# Live servers (in-process and CLI subprocesses), about 100 s of the suite on two workers: the
# whole module is in the `slow` tier, so `-m "not slow"` stays a quick check.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "Zorvak lives in Quarn and keeps an owl.",
    "Belna is a glassblower from Ostreth.",
    "The river Quarn floods every spring.",
    "Ostreth has a glass market on the hill.",
]
PROMPTS = [
    "Who keeps an owl?",
    "Belna",
    "The river floods",
    "Zorvak lives in Quarn and keeps",
    "Where is Ostreth?",
    "glass market",
    "Quarn",
    "an owl",
]
ENGINE_OPTIONS = dict(num_pages=256, page_size=4, prefill_chunk=32, max_reason_tokens=6, batch_size=8)
SERVER_OPTIONS = dict(slots=8, max_len=256, max_memories=4, steps_per_chunk=4)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TIMEOUT = 120  # seconds any one call may take on a busy 2-core machine


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny random model (weights scaled so greedy outputs vary) exported as HF."""
    tokenizer = Tokenizer(demo_world.train_tokenizer((DOCS + PROMPTS) * 3, vocab_size=360))
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
    params = jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x, params)
    out = tmp_path_factory.mktemp("serve") / "tiny"
    hf.save_pretrained(config, params, out, tokenizer)
    (out / "chat_template.jinja").write_text(CHATML, encoding="utf-8")  # read as the model's own template
    return out


@pytest.fixture(scope="module")
def reference(export) -> Engine:
    return Engine.from_pretrained(export, **ENGINE_OPTIONS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcessServer:
    """uvicorn on a thread of this process, on a free loopback port."""

    def __init__(self, engine: Engine, api_key: str | None = None, worker: Worker | None = None):
        self.worker = worker or Worker(engine, **SERVER_OPTIONS)
        self.app = create_app(self.worker, model_name="tiny", api_key=api_key)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, timeout=TIMEOUT, max_retries=0)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def server(export):
    srv = InProcessServer(Engine.from_pretrained(export, **ENGINE_OPTIONS))
    yield srv
    srv.close()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return server.client()


def _clear_bank(server) -> None:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as h:
        for m in h.get("/v1/memories", params={"limit": 1000}).json()["data"]:
            assert h.delete(f"/v1/memories/{m['id']}").status_code == 200


# --- OpenAI routes ------------------------------------------------------------------------


def test_models_completions_chat_and_streams_match_the_engine(server, client, reference):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert out.choices[0].text == reference.generate(PROMPTS[0], max_new_tokens=8)
    assert out.choices[0].finish_reason in ("stop", "length")
    n_prompt = len(reference.tokenizer.encode(PROMPTS[0]))
    assert out.usage.prompt_tokens == n_prompt and out.usage.total_tokens == n_prompt + out.usage.completion_tokens
    assert out.usage.completion_tokens >= 1

    long = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=24)
    streamed = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=24, stream=True)
    pieces = [c.choices[0].text for c in streamed if c.choices]
    assert "".join(pieces) == long.choices[0].text and len([p for p in pieces if p]) > 1

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROMPTS[4]}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10)
    prompt = render_messages(reference, messages)
    assert chat.choices[0].message.content == reference.generate(prompt, max_new_tokens=10)
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=24).choices[0].text
    assert len(full) > 6
    stop = full[3:6]
    cut = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=24, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_sampling_with_a_seed_repeats(client):
    a, b = (
        client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
        .choices[0]
        .text
        for _ in range(2)
    )
    assert a == b


def test_embeddings_equal_engine_embed_for_every_input_form(client, reference):
    got = client.embeddings.create(model="tiny", input=DOCS)  # the client asks for base64 and decodes it
    want = reference.embed(DOCS)
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, atol=1e-5)
    assert [d.index for d in got.data] == list(range(len(DOCS)))
    one = client.embeddings.create(model="tiny", input=DOCS[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, want[0], atol=1e-5)
    tokens = [reference.tokenizer.encode(d) for d in DOCS]
    by_tokens = client.embeddings.create(model="tiny", input=tokens)  # what LangChain's OpenAIEmbeddings sends
    np.testing.assert_allclose(np.array([d.embedding for d in by_tokens.data]), want, atol=1e-5)
    single = client.embeddings.create(model="tiny", input=tokens[1], encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, want[1], atol=1e-5)
    assert got.usage.prompt_tokens == sum(map(len, tokens))
    instructed = client.embeddings.create(model="tiny", input=DOCS[:2], extra_body={"instruction": "Find: "})
    np.testing.assert_allclose(
        np.array([d.embedding for d in instructed.data]), reference.embed(DOCS[:2], instruction="Find: "), atol=1e-5
    )
    reasoned = client.embeddings.create(model="tiny", input=DOCS[:2], extra_body={"reason": True})
    np.testing.assert_allclose(
        np.array([d.embedding for d in reasoned.data]), reference.embed(DOCS[:2], reason=True), atol=1e-5
    )
    raw = httpx.post(
        str(client.base_url) + "embeddings", json={"input": DOCS[2], "encoding_format": "base64"}, timeout=TIMEOUT
    ).json()
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4"), want[2], atol=1e-5)


# --- memories -----------------------------------------------------------------------------


def test_memories_add_list_get_replace_delete_search_and_rag(server, client, reference):
    _clear_bank(server)
    h = httpx.Client(base_url=server.url, timeout=TIMEOUT)
    long_doc = DOCS[0] + " " + DOCS[1]
    added = h.post("/v1/memories", json={"texts": [DOCS[2], long_doc]}).json()
    assert [len(r) for r in added["ids"]] == [1, 2]  # the long text is two segments of at most 16 tokens
    ids = [i for row in added["ids"] for i in row]
    np.testing.assert_allclose(added["embeddings"][0][0], reference.embed(DOCS[2]), atol=1e-5)
    assert added["segments"][0] == [reference.tokenizer.decode(reference.tokenizer.encode(DOCS[2]))]

    page = h.get("/v1/memories", params={"offset": 1, "limit": 1}).json()
    assert page["total"] == 3 and [m["id"] for m in page["data"]] == [ids[1]]
    got = h.get(f"/v1/memories/{ids[0]}").json()
    assert got["version"] == 0 and got["text"] == added["segments"][0][0]

    replaced = h.put(f"/v1/memories/{ids[0]}", json={"text": DOCS[3]}).json()
    assert replaced["version"] == 1
    np.testing.assert_allclose(replaced["embedding"], reference.embed(DOCS[3]), atol=1e-5)

    hits = h.post("/v1/memories/search", json={"query": DOCS[3], "top_k": 2}).json()["data"]
    assert hits[0]["id"] == ids[0] and len(hits) == 2
    np.testing.assert_allclose(hits[0]["score"], 1.0, atol=1e-5)

    rag = h.post("/v1/rag", json={"question": PROMPTS[0], "top_k": 2, "max_tokens": 8}).json()
    assert len(rag["memory_ids"]) == 2 and rag["scores"] == sorted(rag["scores"], reverse=True)
    direct = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=8, extra_body={"memory_ids": rag["memory_ids"]}
    )
    assert rag["answer"] == direct.choices[0].text
    # Reading memories changes the answer against the reference engine reading the same memories.
    reference.bank = MemoryBank(reference.bank_spec)
    ref_ids = reference.compress([DOCS[3]])[0] + reference.compress([long_doc])[0]
    with_memories = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=8, extra_body={"memory_ids": [ids[0], ids[1], ids[2]]}
    )
    assert with_memories.choices[0].text == reference.generate(PROMPTS[0], memories=ref_ids, max_new_tokens=8)

    assert h.delete(f"/v1/memories/{ids[1]}").json()["deleted"] is True
    gone = h.get(f"/v1/memories/{ids[1]}")
    assert gone.status_code == 404 and str(ids[1]) in gone.json()["error"]["message"]
    h.close()


def test_memory_priors_give_what_engine_generate_and_rag_give(server, client, reference):
    _clear_bank(server)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as h:
        ids = [row[0] for row in h.post("/v1/memories", json={"texts": DOCS}).json()["ids"]]
        reference.bank = MemoryBank(reference.bank_spec)
        ref_ids = [row[0] for row in reference.compress(DOCS)]
        read = [2, 0, 3]
        differs = 0
        requests = []
        for prompt in PROMPTS[:4]:
            want = reference.generate(prompt, memories=[ref_ids[i] for i in read], max_new_tokens=12, memory_prior=True)
            plain = reference.generate(prompt, memories=[ref_ids[i] for i in read], max_new_tokens=12)
            body = {"prompt": prompt, "max_tokens": 12, "memory_ids": [ids[i] for i in read]}
            got = h.post("/v1/completions", json={**body, "memory_prior": True}).json()["choices"][0]["text"]
            assert got == want
            assert h.post("/v1/completions", json=body).json()["choices"][0]["text"] == plain
            differs += want != plain
            requests += [({**body, "memory_prior": True}, want), (body, plain)]
        assert differs  # the priors change some answer, so equal answers mean something
        # with requests without priors in the same decode chunks, each still gets its own answer
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            together = list(
                pool.map(lambda r: h.post("/v1/completions", json=r[0]).json()["choices"][0]["text"], requests)
            )
        assert together == [want for _, want in requests]
        # priors from the prompt's self-reasoned embedding, as Engine.generate(memory_prior="reason")
        reasoned_differs = 0
        for prompt in PROMPTS[:4]:
            memories = [ref_ids[i] for i in read]
            want = reference.generate(prompt, memories=memories, max_new_tokens=12, memory_prior="reason")
            plain_prior = reference.generate(prompt, memories=memories, max_new_tokens=12, memory_prior=True)
            reasoned_differs += want != plain_prior
            body = {"prompt": prompt, "max_tokens": 12, "memory_ids": [ids[i] for i in read], "memory_prior": "reason"}
            r = h.post("/v1/completions", json=body).json()
            assert "choices" in r, r
            assert r["choices"][0]["text"] == want
        assert reasoned_differs  # so that a server reading "reason" as true would fail above

        rag = h.post(
            "/v1/rag", json={"question": PROMPTS[0], "top_k": 3, "max_tokens": 12, "memory_prior": True}
        ).json()
        want = reference.rag(PROMPTS[0], top_k=3, max_new_tokens=12, memory_prior=True)
        assert rag["answer"] == want.answer and rag["memory_ids"] == [ids[ref_ids.index(i)] for i in want.memory_ids]
        bad = h.post("/v1/completions", json={"prompt": "Belna", "memory_prior": True, "prior_temperature": 0})
        assert bad.status_code == 422 and "prior_temperature" in bad.json()["error"]["message"]


# --- continuous batching ------------------------------------------------------------------


def _requests(memory_ids: list[int]) -> list[dict]:
    out = []
    for i in range(16):
        r = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 3 + 5 * (i % 6)}
        if i % 3 == 1:
            r["extra_body"] = {"memory_ids": memory_ids[i % len(memory_ids) :][:2]}
        out.append(r)
    return out


def test_concurrent_greedy_requests_give_the_one_at_a_time_outputs(server, client):
    _clear_bank(server)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as h:
        ids = [i for row in h.post("/v1/memories", json={"texts": DOCS}).json()["ids"] for i in row]
    requests = _requests(ids)
    one_at_a_time = [client.completions.create(model="tiny", **r).choices[0].text for r in requests]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: client.completions.create(model="tiny", **r).choices[0].text, requests))
    assert together == one_at_a_time
    assert len(set(one_at_a_time)) > 4  # the outputs differ, so equal lists mean something
    metrics = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    for name in ("grc_requests_total", "grc_generation_tokens_total", "grc_queue_depth", "grc_kv_pages_in_use"):
        assert name in metrics


def test_a_long_request_started_first_does_not_hold_back_a_short_one(server, client):
    # A prompt whose greedy continuation runs to its budget (no eos), so the long request is long.
    prompt = next(
        p
        for p in PROMPTS
        if client.completions.create(model="tiny", prompt=p, max_tokens=200).choices[0].finish_reason == "length"
    )
    first_text = threading.Event()
    long_done = {}

    def long_request():
        for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=200, stream=True):
            if chunk.choices and chunk.choices[0].text:
                first_text.set()
        long_done["at"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    thread.start()
    assert first_text.wait(TIMEOUT)
    short = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=2)
    short_done = time.monotonic()
    thread.join(TIMEOUT)
    assert short.choices[0].text and "at" in long_done
    assert short_done < long_done["at"]


def test_requests_wait_while_the_page_pool_is_full_and_then_run(server, client):
    # Each request takes 64 of the pool's 256 pages: four run at once, the others wait for pages.
    batch = server.worker.batch
    requests = [
        {"prompt": PROMPTS[i], "max_tokens": 256 - len(server.worker.engine.tokenizer.encode(PROMPTS[i]))}
        for i in range(7)
    ]
    alone = [client.completions.create(model="tiny", **requests[i]).choices[0].text for i in (0, 6)]
    most_waiting = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            most_waiting.append(len(batch.waiting))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        together = list(pool.map(lambda r: client.completions.create(model="tiny", **r).choices[0].text, requests))
    stop.set()
    watcher.join()
    assert max(most_waiting) >= 1
    assert [together[0], together[6]] == alone
    batch.decoder.allocator.check()
    assert batch.pages_in_use == 0


def test_a_server_on_a_bank_directory_reads_only_the_memories_requests_use(export, tmp_path, monkeypatch):
    from grc_jax.inference import memory_bank

    writer = Engine.from_pretrained(export, **ENGINE_OPTIONS)
    writer.bank = MemoryBank.open(tmp_path / "bank", writer.bank_spec)
    ids = [row[0] for row in writer.compress(DOCS)]
    want = writer.generate(PROMPTS[0], memories=[ids[2], ids[0]], max_new_tokens=8)
    reads: list[int] = []
    real = memory_bank._read_kv
    monkeypatch.setattr(memory_bank, "_read_kv", lambda file, *a: reads.append(int(file.stem)) or real(file, *a))
    engine = Engine.from_pretrained(export, **ENGINE_OPTIONS)
    engine.bank = MemoryBank.open(tmp_path / "bank", engine.bank_spec)
    srv = InProcessServer(engine)
    try:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as h:
            assert h.get("/v1/memories").json()["total"] == len(DOCS)
            hits = h.post("/v1/memories/search", json={"query": DOCS[1], "top_k": 1}).json()["data"]
            assert hits[0]["id"] == ids[1]
        assert reads == []  # listing and search read embeddings only
        got = srv.client().completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=8, extra_body={"memory_ids": [ids[2], ids[0]]}
        )
        assert got.choices[0].text == want
        assert sorted(reads) == sorted([ids[2], ids[0]])
    finally:
        srv.close()


def test_health_says_ok_only_after_the_warm_up_and_then_requests_compile_nothing(export):
    from grc_jax.inference import engine as engine_module
    from grc_jax.inference import scheduler

    engine = Engine.from_pretrained(export, **ENGINE_OPTIONS)
    # shapes no other test's server uses, so the compile caches below see this server's programs only
    worker = Worker(engine, slots=3, max_len=72, max_memories=2, steps_per_chunk=4)
    gate, warmed = threading.Event(), threading.Event()
    real = worker.warm_up

    def gated_warm_up():
        assert gate.wait(TIMEOUT)
        real()
        warmed.set()

    worker.warm_up = gated_warm_up
    srv = InProcessServer(engine, worker=worker)
    try:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as h:
            r = h.get("/health")
            assert r.status_code == 503 and r.json() == {"status": "warming up"}
            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a request sent now waits, then runs
                early = pool.submit(h.post, "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4})
                time.sleep(0.3)
                assert not early.done()
                gate.set()
                deadline = time.monotonic() + TIMEOUT
                while (r := h.get("/health")).status_code != 200:
                    assert r.status_code == 503 and time.monotonic() < deadline
                    time.sleep(0.05)
                assert warmed.is_set() and r.json() == {"status": "ok"}
                assert early.result(TIMEOUT).status_code == 200
            compiled = [
                f._cache_size() for f in (scheduler.decode_slots, scheduler.prefill_slots, engine_module.segment_pass)
            ]
            prompt = " ".join(PROMPTS)  # about 20 tokens: the smallest prefill capacity
            assert h.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6}).status_code == 200
            assert h.post("/v1/embeddings", json={"input": DOCS[0]}).status_code == 200
            assert [
                f._cache_size() for f in (scheduler.decode_slots, scheduler.prefill_slots, engine_module.segment_pass)
            ] == compiled
    finally:
        srv.close()


# --- bad input and auth -------------------------------------------------------------------


@pytest.mark.parametrize(
    "route, body, status, field",
    [
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"prompt": [[]]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "Belna", "max_tokens": 0}, 422, "max_tokens"),
        ("/v1/completions", {"prompt": "Belna", "temperature": 3}, 422, "temperature"),
        ("/v1/completions", {"prompt": "Belna", "temperature": -1}, 422, "temperature"),
        ("/v1/completions", {"prompt": "Belna", "top_p": 0}, 422, "top_p"),
        ("/v1/completions", {"prompt": "Belna", "max_tokens": 100000}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "Belna " * 300}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": [99999]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "Belna", "memory_ids": [123456]}, 404, "memory_ids"),
        ("/v1/completions", {"prompt": "Belna", "memory_ids": ["12"]}, 422, "memory_ids"),
        ("/v1/completions", {"prompt": "Belna", "n": 2}, 400, "n"),
        ("/v1/completions", {"prompt": "Belna", "memory_ids": [0, 1, 2, 3, 4]}, 400, "memory_ids"),
        ("/v1/completions", {}, 422, "prompt"),
        ("/v1/chat/completions", {"messages": []}, 422, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
            422,
            "max_tokens",
        ),
        ("/v1/embeddings", {"input": ""}, 400, "input"),
        ("/v1/embeddings", {"input": []}, 400, "input"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
        ("/v1/embeddings", {"input": "x", "dimensions": 3}, 400, "dimensions"),
        ("/v1/memories", {"texts": [""]}, 400, "texts"),
        ("/v1/memories", {"texts": []}, 422, "texts"),
        ("/v1/memories/search", {"query": "owl", "top_k": 0}, 422, "top_k"),
        ("/v1/rag", {"question": "", "top_k": 1}, 400, "question"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field_and_others_go_on(server, route, body, status, field):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as h:
        if route in ("/v1/memories/search", "/v1/rag"):
            h.post("/v1/memories", json={"texts": DOCS[:1]})
        r = h.post(route, json=body)
        assert r.status_code == status, r.text
        assert field in r.json()["error"]["message"], r.json()
        assert h.get("/health").json() == {"status": "ok"}
        ok = h.post("/v1/completions", json={"prompt": "Belna", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"]


def test_unknown_memory_routes_are_404(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as h:
        assert h.get("/v1/memories/987654").status_code == 404
        assert h.put("/v1/memories/987654", json={"text": "x"}).status_code == 404
        assert h.delete("/v1/memories/987654").status_code == 404
        r = h.get("/v1/memories", params={"limit": 0})
        assert r.status_code == 400 and "limit" in r.json()["error"]["message"]


def test_api_key_guards_every_route_but_health(export):
    srv = InProcessServer(Engine.from_pretrained(export, **ENGINE_OPTIONS), api_key="s3cret")
    try:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as h:
            assert h.get("/health").status_code == 200
            for route in ("/v1/models", "/metrics", "/v1/memories"):
                assert h.get(route).status_code == 401
                assert h.get(route, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert h.post("/v1/completions", json={"prompt": "x"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").models.list()
        assert srv.client("s3cret").completions.create(model="tiny", prompt="Belna", max_tokens=2).choices
    finally:
        srv.close()


def test_without_an_api_key_no_header_is_needed(server):
    assert httpx.get(server.url + "/v1/models", timeout=TIMEOUT).status_code == 200


# --- the CLI: durable bank, kill -9, SIGTERM ----------------------------------------------


def _start_cli(export: Path, bank: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "grc_jax.serve",
            f"--model={export}",
            f"--bank={bank}",
            f"--port={port}",
            "--slots=4",
            "--max-len=128",
            "--page-size=4",
            "--num-pages=128",
            "--steps-per-chunk=4",
            "--log-level=warning",
            "--no-warm-up",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_healthy(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not become healthy in 180 s")


def test_kill_9_during_memory_adds_loses_no_acknowledged_memory_and_sigterm_exits_cleanly(export, tmp_path):
    bank = tmp_path / "bank"
    port = _free_port()
    proc = _start_cli(export, bank, port)
    acked: dict[int, str] = {}
    try:
        _wait_healthy(proc, port)
        stop = threading.Event()

        def add(n: int) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as h:
                i = 0
                while not stop.is_set():
                    text = f"{DOCS[i % len(DOCS)]} {n}-{i}"
                    try:
                        r = h.post("/v1/memories", json={"texts": [text], "return_embeddings": False})
                    except httpx.HTTPError:
                        return
                    if r.status_code == 200:
                        acked[r.json()["ids"][0][0]] = r.json()["segments"][0][0]
                    i += 1

        threads = [threading.Thread(target=add, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + TIMEOUT
        while len(acked) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(acked) >= 12
    spec = Engine.from_pretrained(export, **ENGINE_OPTIONS).bank_spec
    loaded = MemoryBank.load(bank, expect=spec)
    for memory_id, text in acked.items():
        assert loaded.get(memory_id).text == text
    assert loaded.next_id > max(acked)

    # Restart on the same bank: every memory is served, a new one gets a new id; SIGTERM during a
    # generation lets it finish, then the server exits 0.
    proc = _start_cli(export, bank, port)
    try:
        _wait_healthy(proc, port)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as h:
            assert h.get("/v1/memories", params={"limit": 1000}).json()["total"] == len(loaded)
            new = h.post("/v1/memories", json={"texts": [DOCS[0]]}).json()["ids"][0][0]
            assert new >= loaded.next_id
            result = {}

            def generate():
                result["r"] = h.post("/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 100})

            t = threading.Thread(target=generate)
            t.start()
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            t.join(TIMEOUT)
        assert proc.wait(60) == 0
        assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["finish_reason"]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert new in MemoryBank.load(bank, expect=spec)


def test_the_cli_names_a_bad_model_path_in_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "grc_jax.serve", f"--model={tmp_path}"],
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(tmp_path) in r.stderr


# --- MemoryBank: load checks and bank directories -----------------------------------------


def _spec() -> BankSpec:
    return BankSpec(num_layers=2, num_latents=4, num_kv_heads=2, head_dim=8, embed_dim=32, dtype="bfloat16")


def _memories(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    kv = lambda: rng.normal(size=(n, 2, 4, 2, 8)).astype(ml_dtypes.bfloat16)
    return kv(), kv(), rng.normal(size=(n, 32)).astype(np.float32)


def _rewrite_npz_meta(path: Path, **changes) -> None:
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    for key, value in changes.items():
        if key == "ids":
            arrays["ids"] = np.asarray(value, np.int64)
        else:
            meta[key] = value
    arrays["meta"] = np.asarray(json.dumps(meta))
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(next_id=1), r"ids \[1, 2\] are not below next_id=1"),
        (dict(ids=[0, 0, 2]), r"ids \[0\] appear more than once"),
        (dict(texts=["a", "b"]), r"3 ids but 2 texts"),
        (dict(versions=[0]), r"3 ids but 1 versions"),
        (dict(ids=[0, 1]), r"2 ids but 3 keys, 3 values, 3 embeddings, 3 texts, 3 versions"),
        (dict(ids=[0, -1, 2]), r"memory ids must be integers >= 0"),
    ],
)
def test_loading_a_bank_checks_its_ids_and_lengths(tmp_path, change, message):
    bank = MemoryBank(_spec())
    bank.add(*_memories(3), texts=["a", "b", "c"])
    path = bank.save(tmp_path / "bank.npz")
    _rewrite_npz_meta(path, **change)
    with pytest.raises(ValueError, match=message):
        MemoryBank.load(path)


def test_a_bank_directory_writes_each_change_through_and_reloads_bit_exact(tmp_path):
    spec = _spec()
    bank = MemoryBank.open(tmp_path / "bank", spec)
    keys, values, embeddings = _memories(3)
    ids = bank.add(keys, values, embeddings, texts=["a", "b", None])
    files = sorted((tmp_path / "bank" / "memories").iterdir())
    assert len(files) == 3 and all(f.suffix == ".safetensors" for f in files)
    before = {f.name: f.stat().st_mtime_ns for f in files}
    k2, v2, e2 = _memories(1, seed=1)
    bank.replace(ids[1], k2[0], v2[0], e2[0], "b2")
    bank.remove([ids[0]])
    after = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "bank" / "memories").iterdir()}
    assert set(after) == set(before) - {files[0].name}
    assert after[files[2].name] == before[files[2].name]  # an untouched memory's file is not rewritten
    again = MemoryBank.open(tmp_path / "bank", spec)
    assert again.ids == [ids[1], ids[2]] and again.next_id == 3
    assert again.get(ids[1]).text == "b2" and again.get(ids[1]).version == 1 and again.get(ids[2]).text is None
    assert again.get(ids[1]).keys.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(again.get(ids[1]).keys.view(np.uint16), k2[0].view(np.uint16))
    np.testing.assert_array_equal(again.get(ids[2]).values.view(np.uint16), values[2].view(np.uint16))
    assert again.add(*_memories(1)) == [3]  # removed ids are never reused
    # A crash after an add's memory files but before bank.json: the next id counts them in.
    index = tmp_path / "bank" / "bank.json"
    stale = json.loads(index.read_text())
    stale["next_id"] = 2
    index.write_text(json.dumps(stale))
    assert MemoryBank.open(tmp_path / "bank", spec).next_id == 4
    # a .npz bank converts to a directory
    npz = again.save(tmp_path / "old.npz")
    converted = MemoryBank.load(npz).save_to_directory(tmp_path / "converted")
    assert MemoryBank.load(tmp_path / "converted").ids == converted.ids == again.ids
    with pytest.raises(ValueError, match="a file, not a memory bank directory"):
        MemoryBank.open(npz, spec)
