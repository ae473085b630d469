"""Prometheus metrics of one server (its own registry, so several servers in one process, as in
the tests, do not collide)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("grc_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("grc_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.generation_tokens = Counter("grc_generation_tokens", "Tokens generated", registry=r)
        self.embedded_inputs = Counter("grc_embedded_inputs", "Inputs embedded", registry=r)
        self.queue_depth = Gauge(
            "grc_queue_depth", "Generation requests waiting for a decode slot or pages", registry=r
        )
        self.running = Gauge("grc_running_requests", "Generation requests in the decode batch", registry=r)
        self.pages_in_use = Gauge(
            "grc_kv_pages_in_use", "KV pages held by running requests and their memories", registry=r
        )
        self.pages_total = Gauge("grc_kv_pages_total", "KV pages in the pool", registry=r)
        self.memories = Gauge("grc_memories", "Memories in the bank", registry=r)
        self.ttft = Histogram(
            "grc_time_to_first_token_seconds",
            "Time from request to its first text",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

    def update(self, worker) -> None:
        batch = worker.batch
        self.queue_depth.set(len(batch.waiting) + worker.inbox.qsize())
        self.running.set(batch.running)
        self.pages_in_use.set(batch.pages_in_use)
        self.pages_total.set(batch.decoder.allocator.num_pages)
        self.memories.set(len(worker.engine.bank))

    def render(self) -> bytes:
        return generate_latest(self.registry)
