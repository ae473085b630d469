"""The engine thread: the one thread that touches the model, its page pool and the memory bank.

HTTP handlers never call the Engine. They put work on this thread's inbox and await the
answer:
- generation requests go into the `SlotBatch` (continuous batching: they join the running
  decode rows between chunks, and wait there while the page pool is full);
- embedding requests and memory additions that arrive together run as one batch each;
- every other call (search, a memory read or edit, a self-reasoned embedding) runs alone
  between two chunks.
Tokens come back as text deltas through `GenerationJob`, which also applies stop strings.
A failing request gets its own exception; the thread itself never stops on one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from grc_jax.inference import Engine
from grc_jax.inference.decoder import bucket
from grc_jax.inference.scheduler import SlotBatch, SlotRequest

log = logging.getLogger("grc_jax.serve")

# Special tokens that end a turn in common chat templates: generation stops at any the
# tokenizer has, besides the engine's eos.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


@dataclasses.dataclass
class Finished:
    finish_reason: str  # "stop" or "length"
    completion_tokens: int


class GenerationJob:
    """One generation's text as it grows. `on_tokens` runs on the engine thread and posts
    ("delta", text), then ("done", Finished) or ("error", exception), to an asyncio queue."""

    def __init__(self, engine: Engine, stop_ids: set[int], stops: Sequence[str], loop: asyncio.AbstractEventLoop):
        self.engine, self.stop_ids, self.stops = engine, stop_ids, [s for s in stops if s]
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.tokens: list[int] = []
        self.made = 0
        self.sent = ""
        self.cancelled = False
        self.request: SlotRequest | None = None
        self.outbox: list | None = None  # set by the Worker: events wait there for its one hand-over per step
        # memory priors: None, True (the prompt's own embedding) or the caller's scores; temperature
        self.prior: tuple[bool | list[float], float] | None = None
        self._closed = False

    def _post(self, *event: Any) -> None:
        if self.outbox is not None:
            self.outbox.append((self, event))
        else:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def on_tokens(self, new: list[int], finished: bool) -> bool:
        if self._closed:
            return True
        if self.request is not None and self.request.error is not None:
            self._closed = True
            self._post("error", self.request.error)
            return True
        reason = None
        for t in new:
            self.made += 1
            if t in self.stop_ids:
                reason = "stop"
                break
            self.tokens.append(t)
        text = self.engine.tokenizer.decode(self.tokens)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            text, reason = text[: min(cuts)], "stop"
        end = finished or reason is not None or self.cancelled
        shown = text
        if not end:
            # Hold back what may still change: a character cut mid-way (U+FFFD) and a tail that
            # could be the start of a stop string.
            shown = shown.rstrip("\ufffd")
            for s in self.stops:
                for n in range(min(len(s) - 1, len(shown)), 0, -1):
                    if shown.endswith(s[:n]):
                        shown = shown[: len(shown) - n]
                        break
        if shown.startswith(self.sent) and len(shown) > len(self.sent):
            self._post("delta", shown[len(self.sent) :])
            self.sent = shown
        if end:
            self._closed = True
            self._post("done", Finished(reason or ("length" if finished else "stop"), self.made))
        return end


@dataclasses.dataclass
class _Call:
    fn: Callable[[], Any]
    future: concurrent.futures.Future


@dataclasses.dataclass
class _Batched:
    kind: str  # "embed" or "compress"
    items: list  # segments (embed) or texts (compress)
    future: concurrent.futures.Future


class Worker:
    """Owns the Engine on one thread; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        *,
        slots: int = 16,
        max_len: int = 1024,
        max_memories: int = 16,
        steps_per_chunk: int = 8,
        on_step: Callable[[Worker], None] | None = None,
        warm_up: bool = True,
    ):
        self.engine = engine
        tokenizer = engine.tokenizer
        ids = {engine.eos_id} | {tokenizer.token_to_id(t) for t in END_TOKENS}
        self.stop_ids = {i for i in ids if i is not None and i < engine.config.vocab_size}
        self.batch = SlotBatch(
            engine.decoder,
            slots=slots,
            max_len=max_len,
            max_memories=max_memories,
            steps_per_chunk=steps_per_chunk,
            stop_token_ids=sorted(self.stop_ids),
            memory_source=engine._memory_source,
        )
        self.inbox: queue.Queue = queue.Queue()
        self.on_step = on_step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="grc-engine", daemon=True)
        self.steps = 0
        self.warm_up_on_start = warm_up
        # Events of every job, handed to the event loop once per step: one wake-up of the loop
        # per chunk, not one per request and chunk.
        self._outbox: list[tuple[GenerationJob, tuple]] = []
        self.ready = threading.Event()  # set once warmed up (at once without a warm-up): /health says ok

    # --- the asyncio side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finishes what is queued and running, then ends the thread."""
        self._stop.set()
        self.inbox.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Runs fn() on the engine thread between two decode chunks."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.inbox.put(_Call(fn, future))
        return await asyncio.wrap_future(future)

    async def embed(self, segments: list[list[int]]) -> Any:
        """Embeddings of token segments, batched with other requests' segments."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.inbox.put(_Batched("embed", segments, future))
        return await asyncio.wrap_future(future)

    async def compress(self, texts: list[str]) -> list[list[int]]:
        """Memory ids per text (on disk with a durable bank), batched with other additions."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.inbox.put(_Batched("compress", texts, future))
        return await asyncio.wrap_future(future)

    def generation(
        self,
        prompt: list[int],
        max_tokens: int,
        *,
        memory_ids: Sequence[int] = (),
        stops: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        memory_prior: bool | str | Sequence[float] = False,
        prior_temperature: float = 0.05,
    ) -> GenerationJob:
        """Queues a generation; raises RequestTooLarge (a request that can never run) or
        KeyError (an unknown memory id) at once. Read the job's `events`. memory_prior: read the
        memories under priors (docs/design.md section 8) from the prompt's own embedding (True),
        its self-reasoned embedding ("reason") or these scores, one per memory, as
        `Engine.generate` does."""
        job = GenerationJob(self.engine, self.stop_ids, stops, asyncio.get_running_loop())
        job.outbox = self._outbox
        if memory_prior is not False and memory_prior is not None and len(memory_ids) > 1:
            # one memory gets prior 0 (log_softmax of one score): no bias, nothing to compute
            prior = memory_prior if memory_prior in (True, "reason") else [float(x) for x in memory_prior]
            job.prior = (prior, float(prior_temperature))
        request = SlotRequest(
            prompt=list(prompt),
            max_tokens=max_tokens,
            on_tokens=job.on_tokens,
            memories=[int(m) for m in memory_ids],
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed if seed is not None else time.time_ns() % 2**32,
        )
        self.batch.check(request)
        job.request = request
        self.inbox.put(job)
        return job

    # --- the engine thread ------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compiles what the first requests would otherwise wait for: the decode chunk, the
        prefill of every capacity the batch uses (32, 64, ... up to the prefill chunk), and the
        embedding and compression pass of one segment of every width it pads to. Runs on the engine
        thread before it takes requests (they queue meanwhile)."""
        started = time.monotonic()
        engine, batch = self.engine, self.batch
        token = next(t for t in range(engine.config.vocab_size) if t not in self.stop_ids)
        K, P = engine.config.num_latents, engine.config.max_segment_len
        widths = {min(bucket(n + K), P + K): n for n in range(P, 0, -1)}  # each segment width, shortest n
        for n in sorted(widths.values()):
            engine.embed_tokens([[token] * n])
        limit, capacity = batch.settings.prefill_chunk, 32
        while True:
            self._warm_prefill(min(capacity, limit), token)
            if capacity >= limit:
                break
            capacity *= 2
        log.info("warmed up in %.1f s", time.monotonic() - started)

    def _warm_prefill(self, capacity: int, token: int) -> None:
        """Runs rows of `token` whose prompts together leave `capacity` tokens to prefill (the
        capacity `SlotBatch.step` picks for them), each making one token."""
        per_row = self.batch.max_len - 2  # prompt + 1 new token fit a row; the last prompt token is decoded
        if per_row < 1:
            return
        rows = [min(per_row, capacity - i) for i in range(0, capacity, per_row)]
        if len(rows) > self.batch.slots:
            return
        requests = [
            SlotRequest(prompt=[token] * (n + 1), max_tokens=1, on_tokens=lambda new, done: False) for n in rows
        ]
        try:
            for request in requests:
                self.batch.submit(request)
        except ValueError:  # more pages than the pool has: this capacity compiles on first use
            self.batch.waiting.clear()
            return
        while self.batch.running or self.batch.waiting:
            self.batch.step()

    def _loop(self) -> None:
        if self.warm_up_on_start:
            try:
                self.warm_up()
            except Exception:  # serve anyway: the programs compile on first use
                log.exception("warm-up failed")
        self.ready.set()
        while True:
            idle = not self.batch.running and not self.batch.waiting
            if self._stop.is_set() and idle and self.inbox.empty():
                return
            try:
                first = self.inbox.get(timeout=0.5) if idle else self.inbox.get_nowait()
            except queue.Empty:
                first = None
            items = [first] if first is not None else []
            while True:
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    items.append(item)
            try:
                self._handle(items)
                self.batch.step()
                self.steps += 1
            except Exception as e:  # a bug, not a bad request: end what ran, keep serving
                log.exception("engine step failed")
                self.batch.cancel_all(e)
            self._hand_over()
            if self.on_step is not None:
                try:
                    self.on_step(self)
                except Exception:
                    log.exception("metrics update failed")

    def _hand_over(self) -> None:
        """Puts the step's events on their jobs' queues: one call into each event loop."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, event in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, event))
        self._outbox.clear()
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # the loop has closed: nobody is waiting
                pass

    def _handle(self, items: list) -> None:
        embeds = [i for i in items if isinstance(i, _Batched) and i.kind == "embed"]
        compresses = [i for i in items if isinstance(i, _Batched) and i.kind == "compress"]
        self._set_priors([i for i in items if isinstance(i, GenerationJob) and i.prior is not None])
        for item in items:
            if isinstance(item, GenerationJob):
                self._admit_generation(item)
            elif isinstance(item, _Call):
                self._run(item.future, item.fn)
        if embeds:
            self._run_batched(embeds, lambda segs: self.engine.embed_tokens(segs), split_rows=True)
        if compresses:
            self._run_batched(compresses, self._compress_texts, split_rows=False)

    def _set_priors(self, jobs: list[GenerationJob]) -> None:
        """Each job's memory bias, `Engine.memory_priors` of its prompt and memories: the jobs
        that share a prior temperature in one call (their prompts embedded together)."""
        if not jobs:
            return
        # A self-reasoned embedding ("reason") decodes, so it borrows the page pool from the
        # running batch between two chunks, as a self-reasoned /v1/embeddings call does.
        with self.batch.lend_pool():
            self._compute_priors(jobs)

    def _compute_priors(self, jobs: list[GenerationJob]) -> None:
        groups: dict[tuple[bool | str, float], list[GenerationJob]] = {}
        for job in jobs:  # the prompt's own embedding (True), its reasoned one ("reason"), or scores
            kind = job.prior[0] if job.prior[0] is True or job.prior[0] == "reason" else "scores"
            groups.setdefault((kind, job.prior[1]), []).append(job)
        for (kind, temperature), group in groups.items():
            own = kind != "scores"
            try:
                rows = [job.request.memories for job in group]
                how = kind if own else [job.prior[0] for job in group]
                bias = self.engine.memory_priors([job.request.prompt for job in group], rows, how, temperature)
            except Exception:  # one bad request (a memory deleted meanwhile, bad scores): each alone
                for job in group:
                    try:
                        job.request.memory_bias = self.engine.memory_priors(
                            [job.request.prompt], [job.request.memories], kind if own else [job.prior[0]], temperature
                        )[0]
                    except Exception as e:
                        job.request.error = e
                continue
            for job, row in zip(group, bias):
                job.request.memory_bias = row

    def _admit_generation(self, job: GenerationJob) -> None:
        request = job.request
        if request.error is not None:
            job.on_tokens([], True)
            return
        try:
            # Memory ids to page-pool keys now, on this thread: an id deleted since the handler
            # checked it fails this request alone.
            request.memories = self.engine._pool_keys([request.memories])[0]
            self.batch.submit(request)
        except Exception as e:
            request.error = e
            job.on_tokens([], True)

    def _run(self, future: concurrent.futures.Future, fn: Callable[[], Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            with self.batch.lend_pool():
                result = fn()
        except BaseException as e:
            future.set_exception(e)
        else:
            future.set_result(result)

    def _compress_texts(self, texts: list[str]) -> list[list[int]]:
        return self.engine.compress(texts)

    def _run_batched(self, items: list[_Batched], fn: Callable[[list], Any], split_rows: bool) -> None:
        """One call for every item's rows together; when it fails, each item alone, so one bad
        request does not fail the others."""
        items = [i for i in items if i.future.set_running_or_notify_cancel()]
        if not items:
            return
        rows = [row for i in items for row in i.items]
        try:
            out = fn(rows)
        except Exception:
            for item in items:
                try:
                    item.future.set_result(fn(item.items))
                except Exception as e:
                    item.future.set_exception(e)
            return
        start = 0
        for item in items:
            n = len(item.items)
            item.future.set_result(out[start : start + n])
            start += n


def _deliver(events: list[tuple[GenerationJob, tuple]]) -> None:
    for job, event in events:
        job.events.put_nowait(event)
