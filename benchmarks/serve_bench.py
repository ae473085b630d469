"""Throughput and time to first token of `python -m grc_jax.serve` under 1, 4, 16 and 64
concurrent clients over loopback.

    python benchmarks/serve_bench.py                      # a model of configs/tiny.py's shape, random weights
    python benchmarks/serve_bench.py --model=DIR          # any model Engine.from_pretrained opens
    python benchmarks/serve_bench.py --clients 1 4 --seconds 5 --no-write

The server runs as a subprocess (its own process, as in use). The clients are asyncio tasks of
this one process over one httpx connection pool (cheap: the benchmark shares the machine's
cores with the server). At each level, every client sends streamed greedy `/v1/completions`
requests (`max_tokens` tokens, prompts of 8-40 words, a different one per request) one after
another until the level has run `--seconds` (the request running then goes to its end) and it has
sent at least `--min-requests`; the one-client level is the one-at-a-time baseline, measured
the same way on the same server. A level thus rests on many requests, not on a burst whose
start-up and single slowest request decide it; the table gives how many TTFT samples each
percentile rests on (p99 of n samples is the ceil(0.99 n)-th smallest: the largest when n <= 100).
Output tokens/s = the tokens the server reports (`usage`) / the level's wall time; time to
first token = from sending a request to its first non-empty text. Before the levels, a warm-up
compiles the decode program and each level's prefill capacities. The CPU seconds the server and
the clients used in each level are reported too (Linux). Figures go to benchmarks/RESULTS.md
unless --no-write.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
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
WORDS = (
    "Zorvak lives in Quarn and keeps an owl . Belna is a glassblower from Ostreth ; her mentor "
    "rides to the market every spring when the river floods"
).split()


def make_tiny_model(out: Path) -> Path:
    """configs/tiny.py's model shape (Qwen3 layout, ~0.5M parameters) with random weights."""
    sys.path.insert(0, str(ROOT))
    import jax

    from grc_jax import hf, model
    from grc_jax.config import ModelConfig
    from grc_jax.data import demo_world
    from grc_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer(demo_world.train_tokenizer([" ".join(WORDS)] * 4, vocab_size=400))
    config = ModelConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        num_latents=8,
        max_segment_len=128,
        qk_norm=True,
        architecture="Qwen3ForCausalLM",
    )
    params = model.init_params(config, jax.random.key(0))
    hf.save_pretrained(config, params, out, tokenizer)
    return out


def prompt(i: int) -> str:
    n = 8 + (i * 7) % 33
    return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n))


async def one_request(client: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[float | None, int]:
    """(seconds to the first non-empty text or None, completion tokens the server reports)."""
    body = {
        "prompt": prompt(i),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for attempt in range(3):
        start, first, tokens, answered = time.perf_counter(), None, 0, False
        try:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                answered = True
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        first = time.perf_counter() - start
            return first, tokens
        except (httpx.ReadError, httpx.RemoteProtocolError):
            # Unanswered: a kept-alive connection that the server closed as the request went out
            # (a client held off the CPU past uvicorn's 5 s keep-alive); the request never ran.
            if answered or attempt == 2:
                raise
    raise AssertionError("unreachable")


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank: the ceil(q n)-th smallest."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


async def level(
    url: str,
    clients: int,
    seconds: float,
    min_requests: int,
    max_tokens: int,
    offset: int,
    server_pid: int | None = None,
) -> dict:
    """`clients` clients, each sending requests back to back until `seconds` have passed and it
    has sent `min_requests`."""
    ttfts, tokens, sent = [], 0, 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        server_cpu, client_cpu = cpu_seconds(server_pid) if server_pid else None, time.process_time()
        start = time.perf_counter()
        deadline = start + seconds

        async def client_task() -> None:
            nonlocal tokens, sent
            done = 0
            while done < min_requests or time.perf_counter() < deadline:
                i = offset + sent
                sent += 1
                first, made = await one_request(client, i, max_tokens)
                done += 1
                tokens += made
                if first is not None:
                    ttfts.append(first)

        await asyncio.gather(*(client_task() for _ in range(clients)))
        wall = time.perf_counter() - start
        client_cpu = time.process_time() - client_cpu
        if server_cpu is not None:
            now = cpu_seconds(server_pid)
            server_cpu = None if now is None else now - server_cpu
    ttfts.sort()
    return {
        "clients": clients,
        "requests": sent,
        "ttft_samples": len(ttfts),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(rows: list[dict]) -> str:
    base = rows[0]["tokens_per_s"] if rows and rows[0]["clients"] == 1 else None
    lines = [
        "| clients | requests | TTFT samples | output tokens | wall s | output tokens/s | vs one at a time | "
        "TTFT p50 ms | TTFT p99 ms | p99/p50 | server CPU s | client CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cpu = lambda x: "-" if x is None else f"{x:.1f}"
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['ttft_samples']} | {r['tokens']} | {r['wall_s']:.1f} | "
            f"{r['tokens_per_s']:.1f} | {ratio} | {1000 * r['ttft_p50_s']:.0f} | "
            f"{1000 * r['ttft_p99_s']:.0f} | {r['ttft_p99_s'] / r['ttft_p50_s']:.2f} | "
            f"{cpu(r['server_cpu_s'])} | {cpu(r['client_cpu_s'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: a random model of configs/tiny.py's shape")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument(
        "--seconds", type=float, default=20.0, help="each level's length: clients start no new request after it"
    )
    p.add_argument("--min-requests", type=int, default=2, help="requests each client sends at least")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--server-args", default="--slots=16 --steps-per-chunk=8", help="extra arguments of python -m grc_jax.serve"
    )
    p.add_argument("--url", help="measure a server already running there instead of starting one")
    p.add_argument("--server-pid", type=int, help="with --url: the server's process id, to report its CPU seconds")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()
    server, server_pid = None, args.server_pid
    if args.url:
        url = args.url.rstrip("/")
    else:
        model_path = Path(args.model) if args.model else make_tiny_model(Path(tmp.name) / "tiny")
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "grc_jax.serve",
            f"--model={model_path}",
            f"--port={port}",
            "--log-level=warning",
            *args.server_args.split(),
        ]
        server = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x),
            },
        )
        url, server_pid = f"http://127.0.0.1:{port}", server.pid
    try:
        deadline = time.monotonic() + 900  # the server compiles its programs before it says ready
        while True:
            if (server is not None and server.poll() is not None) or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        # Compile the decode program and the prefill programs of every capacity the levels use.
        for clients in args.clients:
            asyncio.run(level(url, clients, 0, 1, args.max_tokens, 1_000_000))
        rows, offset = [], 0
        for clients in args.clients:
            row = asyncio.run(level(url, clients, args.seconds, args.min_requests, args.max_tokens, offset, server_pid))
            offset += row["requests"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(120)
    text = table(rows)
    print(text)
    if not args.no_write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(f"\n\n<!-- serve_bench {platform.node()} -->\n{text}\n")


if __name__ == "__main__":
    main()
