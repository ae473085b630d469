"""Throughput and time to first token of `python -m grc_jax.serve` under 1, 4, 16 and 64
concurrent clients over loopback.

    python benchmarks/serve_bench.py                      # a model of configs/tiny.py's shape, random weights
    python benchmarks/serve_bench.py --model=DIR          # any model Engine.from_pretrained opens
    python benchmarks/serve_bench.py --clients 1 4 --requests 8 --no-write

The server runs as a subprocess (its own process, as in use); each client is an asyncio task
that sends streamed `/v1/completions` requests one after another (greedy, `max_tokens`
tokens, prompts of 8-40 words, a different one per request) until the level's requests are
used up. Output tokens/s = the tokens the server reports (`usage`) / the level's wall time;
time to first token = from sending a request to its first non-empty text. One client is the
one-at-a-time baseline: every level runs on the same server, after a warm-up request that
compiles the decode program and bursts that compile each prefill capacity. Figures go to
benchmarks/RESULTS.md unless --no-write.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
WORDS = ("Zorvak lives in Quarn and keeps an owl . Belna is a glassblower from Ostreth ; her mentor "
         "rides to the market every spring when the river floods").split()


def make_tiny_model(out: Path) -> Path:
    """configs/tiny.py's model shape (Qwen3 layout, ~0.5M parameters) with random weights."""
    sys.path.insert(0, str(ROOT))
    import jax

    from grc_jax import hf, model
    from grc_jax.config import ModelConfig
    from grc_jax.data import demo_world
    from grc_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer(demo_world.train_tokenizer([" ".join(WORDS)] * 4, vocab_size=400))
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=32, num_latents=8, max_segment_len=128, qk_norm=True,
                         architecture="Qwen3ForCausalLM")
    params = model.init_params(config, jax.random.key(0))
    hf.save_pretrained(config, params, out, tokenizer)
    return out


def prompt(i: int) -> str:
    n = 8 + (i * 7) % 33
    return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n))


async def one_request(client: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[float | None, int]:
    body = {"prompt": prompt(i), "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
    return first, tokens


async def level(url: str, clients: int, requests: int, max_tokens: int, offset: int) -> dict:
    queue = list(range(offset, offset + requests))
    ttfts, tokens = [], 0

    async def client_task():
        nonlocal tokens
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            while queue:
                first, made = await one_request(client, queue.pop(0), max_tokens)
                tokens += made
                if first is not None:
                    ttfts.append(first)

    start = time.perf_counter()
    await asyncio.gather(*(client_task() for _ in range(clients)))
    wall = time.perf_counter() - start
    ttfts.sort()
    pct = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))]
    return {"clients": clients, "requests": requests, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": pct(0.99)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: a random model of configs/tiny.py's shape")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=16, help="requests per level (at least 2 per client)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--server-args", default="--slots=16 --steps-per-chunk=8",
                   help="extra arguments of python -m grc_jax.serve")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()
    model_path = Path(args.model) if args.model else make_tiny_model(Path(tmp.name) / "tiny")
    port = free_port()
    cmd = [sys.executable, "-m", "grc_jax.serve", f"--model={model_path}", f"--port={port}", "--log-level=warning",
           *args.server_args.split()]
    server = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900  # the server compiles its programs before it says ready
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        # Compile the decode program and the prefill programs of every capacity the levels use.
        for clients in args.clients:
            asyncio.run(level(url, clients, clients, args.max_tokens, 10_000))
        rows, offset = [], 0
        for clients in args.clients:
            n = max(args.requests, 2 * clients)
            row = asyncio.run(level(url, clients, n, args.max_tokens, offset))
            offset += n
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(120)
    base = rows[0]["tokens_per_s"] if rows and rows[0]["clients"] == 1 else None
    lines = ["| clients | requests | output tokens | wall s | output tokens/s | vs one at a time | TTFT p50 ms | "
             "TTFT p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | "
                     f"{r['tokens_per_s']:.1f} | {ratio} | {1000 * r['ttft_p50_s']:.0f} | "
                     f"{1000 * r['ttft_p99_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(f"\n\n<!-- serve_bench {platform.node()} -->\n{table}\n")


if __name__ == "__main__":
    main()
