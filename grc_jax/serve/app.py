"""The HTTP routes: OpenAI-compatible generation and embeddings, and GRC's memories, search and RAG.

Handlers validate, tokenize and hand work to the engine thread (`worker.Worker`); they never
touch the model. Every error is a JSON body `{"error": {"message", "type", "param", "code"}}`
with a 4xx status naming the field at fault (unknown memory id: 404).
"""

from __future__ import annotations

import base64
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from grc_jax.inference.scheduler import RequestTooLarge
from grc_jax.serve import schemas as s
from grc_jax.serve.metrics import CONTENT_TYPE, Metrics
from grc_jax.serve.worker import Finished, GenerationJob, Worker

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    code = {401: "invalid_api_key", 404: "not_found"}.get(status)
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class _AuthAndCount:
    """ASGI middleware: the API key check (every route but /health) and the request counter by
    route and status. Plain ASGI rather than `@app.middleware("http")`, whose wrapper costs a
    task and a memory stream per request and a hand-off per streamed chunk."""

    def __init__(self, app: Any, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and scope["path"] != "/health":
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                self.metrics.requests.labels(scope["path"], "401").inc()
                await _error(
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                    kind="authentication_error",
                )(scope, receive, send)
                return
        status = 500  # unless a response starts

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")  # set by the router on this scope
            self.metrics.requests.labels(getattr(route, "path", "unknown"), str(status)).inc()


def render_messages(engine: Any, messages: list[dict[str, Any]]) -> str:
    """The chat prompt for `messages`: the model's chat template, as `Engine.render_chat` renders it."""
    return engine.render_chat(messages)


def create_app(
    worker: Worker,
    *,
    model_name: str,
    api_key: str | None = None,
    metrics: Metrics | None = None,
    default_max_tokens: int = 256,
    memory_prior: bool = False,
    prior_temperature: float = 0.05,
) -> FastAPI:
    """The FastAPI application over a started-or-not `worker` (its lifespan starts and stops it).
    memory_prior, prior_temperature: how requests with memories read them when they do not say
    (the extra-body fields of the same names)."""
    from contextlib import asynccontextmanager

    engine = worker.engine
    metrics = metrics or Metrics()
    worker.on_step = metrics.update
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not worker.alive:
            worker.start()
        yield
        worker.stop()  # after uvicorn has let in-flight requests finish

    app = FastAPI(title="grc_jax", lifespan=lifespan)
    app.state.worker, app.state.metrics = worker, metrics

    # --- errors and auth ----------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error(e.status, e.message, e.param, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        # a union's branch name (str, list[int], ...) is noise in the field path
        loc = [x for x in loc if not (x.startswith(("str", "list[", "int", "float")) or x == "function-after")]
        field = ".".join(loc) or "body"
        return _error(422, f"{field}: {first.get('msg')}", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(KeyError)
    async def _unknown(request: Request, e: KeyError):  # the bank's unknown-id errors
        return _error(404, str(e.args[0]) if e.args else "not found")

    @app.exception_handler(ValueError)
    async def _bad_value(request: Request, e: ValueError):  # the engine's input checks
        return _error(400, str(e))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")

    app.add_middleware(_AuthAndCount, api_key=api_key, metrics=metrics)

    # --- helpers --------------------------------------------------------------------------------

    V, P = engine.config.vocab_size, engine.config.max_segment_len

    def tokens_of(prompt: Any, field: str, index: int | None = None, *, template: bool = False) -> list[int]:
        """A prompt's ids: user text with special tokens split (Engine.tokenize); a rendered chat
        template's special tokens are tokens (template=True)."""
        where = field if index is None else f"{field}[{index}]"
        if isinstance(prompt, str):
            ids = engine.tokenizer.encode(prompt) if template else engine.tokenize(prompt)
            if not ids:
                raise ApiError(400, f"{where}: is empty", field)
            return ids
        ids = list(prompt)
        if not ids:
            raise ApiError(400, f"{where}: is empty", field)
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ApiError(400, f"{where}: token ids {bad[:4]} are outside the vocabulary [0, {V})", field)
        return ids

    def many(value: Any) -> list:
        """A str, list[str], list[int] or list[list[int]] as a list of single inputs."""
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(x, int) for x in value):
            return [value]
        return list(value)

    def check_memories(ids: Sequence[int] | None) -> list[int]:
        ids = list(ids or [])
        if len(ids) > worker.batch.max_memories:
            raise ApiError(
                400,
                f"memory_ids: {len(ids)} memories; this server reads at most {worker.batch.max_memories} per request",
                "memory_ids",
            )
        unknown = [i for i in ids if i not in engine.bank]
        if unknown:
            raise ApiError(404, f"memory_ids: unknown memory id(s) {unknown[:8]}", "memory_ids")
        return ids

    def sampling_of(req: s._Sampling, prompt_len: int, default: int) -> dict[str, Any]:
        if req.n not in (None, 1):
            raise ApiError(400, "n: only n=1 is supported", "n")
        if req.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs: not supported by this server", "logprobs")
        max_tokens = req.max_tokens or req.max_completion_tokens
        if max_tokens is None:
            max_tokens = max(1, min(default, worker.batch.max_len - prompt_len))
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return dict(
            max_tokens=max_tokens,
            stops=stops,
            temperature=req.temperature or 0.0,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            seed=req.seed,
            **prior_of(req),
        )

    def prior_of(req: s._Sampling | s.RagRequest) -> dict[str, Any]:
        return dict(
            memory_prior=memory_prior if req.memory_prior is None else req.memory_prior,
            prior_temperature=prior_temperature if req.prior_temperature is None else req.prior_temperature,
        )

    def start(prompt: list[int], params: dict[str, Any], memory_ids: list[int]) -> GenerationJob:
        try:
            return worker.generation(prompt, memory_ids=memory_ids, **params)
        except RequestTooLarge as e:
            field = "memory_ids" if "memories" in str(e) else "max_tokens"
            raise ApiError(400, f"{field}: {e}", field) from None

    async def events(job: GenerationJob) -> AsyncIterator[list[tuple[str, Any]]]:
        """The job's ("delta", text) and ("done", Finished) events, in lists of all that were
        waiting at once (a stream writes each list in one send); an ("error", e) raises e."""
        try:
            while True:
                batch = [await job.events.get()]
                while not job.events.empty():
                    batch.append(job.events.get_nowait())
                for i, (kind, value) in enumerate(batch):
                    if kind == "error":
                        if i:
                            yield batch[:i]
                        raise value
                yield batch
                if batch[-1][0] == "done":
                    return
        finally:
            job.cancelled = True  # a client that left stops its row at the next chunk

    async def collect(job: GenerationJob, started: float) -> tuple[str, Finished]:
        parts, first = [], True
        try:
            async for batch in events(job):
                for kind, value in batch:
                    if kind == "delta":
                        if first:
                            metrics.ttft.observe(time.monotonic() - started)
                            first = False
                        parts.append(value)
                    else:
                        metrics.generation_tokens.inc(value.completion_tokens)
                        return "".join(parts), value
        except KeyError as e:
            raise ApiError(404, f"memory_ids: {e.args[0] if e.args else e}", "memory_ids") from None
        raise RuntimeError("generation ended without finishing")

    def sse(payload: Any) -> str:
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def sse_head(rid: str, kind: str, created: int, model: str) -> str:
        """A stream's chunks differ only in their choices: the rest is rendered once per request,
        as `data: {...` without its closing brace."""
        return sse({"id": rid, "object": kind, "created": created, "model": model})[:-3]

    # --- OpenAI routes --------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not worker.alive:
            return _error(503, "the engine thread is not running", kind="server_error")
        if not worker.ready.is_set():  # compiling its programs; requests queue meanwhile
            return JSONResponse({"status": "warming up"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=s.ModelList)
    async def models():
        return s.ModelList(data=[s.ModelCard(id=model_name, created=created)])

    @app.post("/v1/completions")
    async def completions(req: s.CompletionRequest):
        started = time.monotonic()
        prompts = [
            tokens_of(p, "prompt", i if not isinstance(req.prompt, str) else None)
            for i, p in enumerate(many(req.prompt))
        ]
        if not prompts:
            raise ApiError(400, "prompt: is empty", "prompt")
        memory_ids = check_memories(req.memory_ids)
        texts = [engine.tokenizer.decode(p) for p in prompts] if req.echo else [""] * len(prompts)
        jobs = [start(p, sampling_of(req, len(p), DEFAULT_COMPLETION_TOKENS), memory_ids) for p in prompts]
        rid, model = f"cmpl-{uuid.uuid4().hex}", req.model or model_name
        prompt_tokens = sum(map(len, prompts))
        metrics.prompt_tokens.inc(prompt_tokens)
        if req.stream:
            created = int(time.time())  # one value for every chunk of the stream, as OpenAI's
            head = sse_head(rid, "text_completion", created, model)

            def piece(index: int, text: str, finish: str | None) -> str:
                return (
                    f'{head},"choices":[{{"index":{index},"text":{json.dumps(text)},'
                    f'"finish_reason":{json.dumps(finish)},"logprobs":null}}]}}\n\n'
                )

            async def stream():
                made, out = 0, []  # `out`: chunks not sent yet; the last ones go with [DONE] in one send
                for i, job in enumerate(jobs):
                    if texts[i]:
                        out.append(piece(i, texts[i], None))
                    try:
                        async for batch in events(job):
                            for kind, value in batch:
                                if kind == "delta":
                                    out.append(piece(i, value, None))
                                else:
                                    made += value.completion_tokens
                                    metrics.generation_tokens.inc(value.completion_tokens)
                                    out.append(piece(i, "", value.finish_reason))
                            if batch[-1][0] != "done":
                                yield "".join(out)
                                out.clear()
                    except Exception as e:
                        out.append(sse({"error": {"message": str(e), "type": "server_error"}}))
                        break
                if (req.stream_options or {}).get("include_usage"):
                    out.append(
                        sse(
                            {
                                "id": rid,
                                "object": "text_completion",
                                "created": created,
                                "model": model,
                                "choices": [],
                                "usage": {
                                    "prompt_tokens": prompt_tokens,
                                    "completion_tokens": made,
                                    "total_tokens": prompt_tokens + made,
                                },
                            }
                        )
                    )
                out.append("data: [DONE]\n\n")
                yield "".join(out)

            return StreamingResponse(stream(), media_type="text/event-stream")
        choices, made = [], 0
        for i, job in enumerate(jobs):
            text, done = await collect(job, started)
            made += done.completion_tokens
            choices.append(s.CompletionChoice(index=i, text=texts[i] + text, finish_reason=done.finish_reason))
        return s.CompletionResponse(
            id=rid,
            created=int(time.time()),
            model=model,
            choices=choices,
            usage=s.Usage(prompt_tokens=prompt_tokens, completion_tokens=made, total_tokens=prompt_tokens + made),
        )

    @app.post("/v1/chat/completions")
    async def chat(req: s.ChatRequest):
        started = time.monotonic()
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                try:
                    content = "".join(part["text"] for part in content if part.get("type") == "text")
                except (KeyError, TypeError):
                    raise ApiError(
                        400, f"messages[{i}].content: text parts need a 'text' field", f"messages[{i}].content"
                    ) from None
            messages.append({"role": m.role, "content": content or ""})
        prompt = tokens_of(render_messages(engine, messages), "messages", template=True)
        memory_ids = check_memories(req.memory_ids)
        job = start(prompt, sampling_of(req, len(prompt), default_max_tokens), memory_ids)
        metrics.prompt_tokens.inc(len(prompt))
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", req.model or model_name
        if req.stream:
            created = int(time.time())
            head = sse_head(rid, "chat.completion.chunk", created, model)

            def chunk(delta: dict, finish: str | None) -> str:
                return (
                    f'{head},"choices":[{{"index":0,"delta":{json.dumps(delta, separators=(",", ":"))},'
                    f'"finish_reason":{json.dumps(finish)},"logprobs":null}}]}}\n\n'
                )

            async def stream():
                # the role goes with the first text; the end, usage and [DONE] in one send
                out, made = [chunk({"role": "assistant", "content": ""}, None)], 0
                try:
                    async for batch in events(job):
                        for kind, value in batch:
                            if kind == "delta":
                                out.append(chunk({"content": value}, None))
                            else:
                                made = value.completion_tokens
                                metrics.generation_tokens.inc(made)
                                out.append(chunk({}, value.finish_reason))
                        if batch[-1][0] != "done":
                            yield "".join(out)
                            out.clear()
                except Exception as e:
                    out.append(sse({"error": {"message": str(e), "type": "server_error"}}))
                if (req.stream_options or {}).get("include_usage"):
                    out.append(
                        sse(
                            {
                                "id": rid,
                                "object": "chat.completion.chunk",
                                "created": created,
                                "model": model,
                                "choices": [],
                                "usage": {
                                    "prompt_tokens": len(prompt),
                                    "completion_tokens": made,
                                    "total_tokens": len(prompt) + made,
                                },
                            }
                        )
                    )
                out.append("data: [DONE]\n\n")
                yield "".join(out)

            return StreamingResponse(stream(), media_type="text/event-stream")
        text, done = await collect(job, started)
        return s.ChatResponse(
            id=rid,
            created=int(time.time()),
            model=model,
            choices=[s.ChatChoice(index=0, message=s.AssistantMessage(content=text), finish_reason=done.finish_reason)],
            usage=s.Usage(
                prompt_tokens=len(prompt),
                completion_tokens=done.completion_tokens,
                total_tokens=len(prompt) + done.completion_tokens,
            ),
        )

    @app.post("/v1/embeddings", response_model=s.EmbeddingResponse)
    async def embeddings(req: s.EmbeddingRequest):
        inputs = many(req.input)
        if not inputs:
            raise ApiError(400, "input: is empty", "input")
        dim = engine.bank_spec.embed_dim
        if req.dimensions is not None and req.dimensions != dim:
            raise ApiError(400, f"dimensions: this model's embeddings have {dim} dimensions", "dimensions")
        prefix = engine.tokenize(req.instruction) if req.instruction else []
        indexed = len(inputs) > 1 or not isinstance(req.input, str)  # name input[i] in errors
        segments = [(prefix + tokens_of(x, "input", i if indexed else None))[:P] for i, x in enumerate(inputs)]
        if req.reason:
            if engine.eor_id is None:
                raise ApiError(400, "reason: this model has no end-of-reasoning token", "reason")
            vectors = await worker.call(lambda: engine.embed_with_reasoning_tokens(segments)[0])
        else:
            vectors = await worker.embed(segments)
        metrics.embedded_inputs.inc(len(segments))
        vectors = np.asarray(vectors, np.float32)
        if req.encoding_format == "base64":
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            data = [v.tolist() for v in vectors]
        used = sum(map(len, segments))
        return s.EmbeddingResponse(
            data=[s.EmbeddingData(index=i, embedding=d) for i, d in enumerate(data)],
            model=req.model or model_name,
            usage=s.Usage(prompt_tokens=used, total_tokens=used),
        )

    # --- GRC routes -----------------------------------------------------------------------------

    def memory_out(memory_id: int, with_embedding: bool) -> s.MemoryOut:
        try:
            m = engine.bank.get(memory_id)
        except KeyError:
            raise ApiError(404, f"memory {memory_id}: no such memory", "id") from None
        return s.MemoryOut(
            id=memory_id,
            text=m.text,
            version=m.version,
            embedding=np.asarray(m.embedding, np.float32).tolist() if with_embedding else None,
        )

    @app.post("/v1/memories", response_model=s.MemoriesAdded, response_model_exclude_none=True)
    async def add_memories(req: s.MemoriesAdd):
        for i, text in enumerate(req.texts):
            if not engine.tokenizer.encode(text):
                raise ApiError(400, f"texts[{i}]: is empty", "texts")
        ids = await worker.compress(req.texts)

        def read():
            out = [[memory_out(i, req.return_embeddings) for i in row] for row in ids]
            return out

        rows = await worker.call(read)
        embeddings = [[m.embedding for m in row] for row in rows] if req.return_embeddings else None
        return s.MemoriesAdded(ids=ids, segments=[[m.text for m in row] for row in rows], embeddings=embeddings)

    @app.get("/v1/memories", response_model=s.MemoryPage, response_model_exclude_none=True)
    async def list_memories(offset: int = 0, limit: int = 100, embeddings: bool = False):
        if offset < 0:
            raise ApiError(400, "offset: must be >= 0", "offset")
        if not 1 <= limit <= 1000:
            raise ApiError(400, "limit: must be in [1, 1000]", "limit")

        def page():
            ids = sorted(engine.bank.ids)
            return len(ids), [memory_out(i, embeddings) for i in ids[offset : offset + limit]]

        total, data = await worker.call(page)
        return s.MemoryPage(data=data, total=total, offset=offset, limit=limit)

    @app.get("/v1/memories/{memory_id}", response_model=s.MemoryOut, response_model_exclude_none=True)
    async def get_memory(memory_id: int, embedding: bool = True):
        return await worker.call(lambda: memory_out(memory_id, embedding))

    @app.put("/v1/memories/{memory_id}", response_model=s.MemoryOut, response_model_exclude_none=True)
    async def replace_memory(memory_id: int, req: s.MemoryReplace):
        def replace():
            if memory_id not in engine.bank:
                raise ApiError(404, f"memory {memory_id}: no such memory", "id")
            try:
                engine.replace_memory(memory_id, req.text)
            except ValueError as e:
                raise ApiError(400, f"text: {e}", "text") from None
            return memory_out(memory_id, True)

        return await worker.call(replace)

    @app.delete("/v1/memories/{memory_id}")
    async def delete_memory(memory_id: int):
        def delete():
            if memory_id not in engine.bank:
                raise ApiError(404, f"memory {memory_id}: no such memory", "id")
            engine.remove_memories([memory_id])

        await worker.call(delete)
        return {"id": memory_id, "object": "memory", "deleted": True}

    async def search_hits(query: str, top_k: int, reason: bool) -> list:
        if not engine.tokenizer.encode(query):
            raise ApiError(400, "query: is empty", "query")
        if not len(engine.bank):
            raise ApiError(400, "the memory bank is empty: add memories before searching")
        return await worker.call(lambda: engine.search(query, top_k=top_k, reason=reason))

    @app.post("/v1/memories/search", response_model=s.SearchResponse)
    async def search(req: s.SearchRequest):
        hits = await search_hits(req.query, req.top_k, req.reason)
        return s.SearchResponse(data=[s.SearchHit(id=h.id, score=h.score, text=h.text) for h in hits])

    @app.post("/v1/rag", response_model=s.RagResponse)
    async def rag(req: s.RagRequest):
        started = time.monotonic()
        prompt = tokens_of(req.question, "question")
        hits = await search_hits(req.question, req.top_k, req.reason)
        ids = [h.id for h in hits]
        prior = prior_of(req)
        if prior["memory_prior"]:  # the search's own scores, as Engine.rag weighs them
            prior["memory_prior"] = [h.score for h in hits]
        job = start(
            prompt,
            dict(
                max_tokens=req.max_tokens,
                stops=[],
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=0,
                seed=req.seed,
                **prior,
            ),
            ids,
        )
        text, done = await collect(job, started)
        return s.RagResponse(
            answer=text,
            memory_ids=ids,
            scores=[h.score for h in hits],
            finish_reason=done.finish_reason,
            usage=s.Usage(
                prompt_tokens=len(prompt),
                completion_tokens=done.completion_tokens,
                total_tokens=len(prompt) + done.completion_tokens,
            ),
        )

    return app
