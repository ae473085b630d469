"""Why the CPU decoder keeps per-layer weights: one decode step's layer loop three ways, and the
whole Decoder both ways, on the ~100M shape of decode_bench.py (batch 1, float32).

    python benchmarks/layer_loop_bench.py

- bare loop: 128 steps of the 12 layers' projections and MLP for one token plus the tied head,
  in a `fori_loop`, with the layers as a `lax.scan` over the stacked weights, as a Python loop
  over static slices of them, and as a Python loop over separate per-layer arrays;
- Decoder: greedy generation of 128 tokens after a 16-token prompt with
  `per_layer_weights=False` (the scan) and `True` (the CPU default).

Prints milliseconds per step (the best of 3 timed calls after a warm-up).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grc_jax import model  # noqa: E402
from grc_jax.config import ModelConfig  # noqa: E402
from grc_jax.inference.decoder import Decoder  # noqa: E402

CONFIG = ModelConfig(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_layers=12,
    num_heads=12,
    num_kv_heads=4,
    head_dim=64,
    tie_word_embeddings=True,
    num_latents=16,
)
STEPS = 128


def best_ms_per_step(fn) -> float:
    fn()
    times = []
    for _ in range(3):
        time.sleep(0.3)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times) / STEPS


def bare_loop(mode: str):
    c = CONFIG
    cos = jnp.ones((1, 1, c.head_dim))
    sin = jnp.zeros((1, 1, c.head_dim))

    def one_layer(p, x):
        q, _, _ = model.attention_inputs(c, p, x, cos, sin)
        return model.layer_output(c, p, x, q)  # q stands in for the attention output: same shape

    def run(layers, embed):
        def step(_, x):
            if mode == "scan":
                x = jax.lax.scan(lambda x, p: (one_layer(p, x), None), x, layers)[0]
            elif mode == "static slices":
                for i in range(c.num_layers):
                    x = one_layer(jax.tree.map(lambda a, i=i: a[i], layers), x)
            else:
                for p in layers:
                    x = one_layer(p, x)
            logits = x[0] @ embed.T
            return x + 1e-9 * logits[:, : c.hidden_size][None]  # keeps the head in the loop

        return jax.lax.fori_loop(0, STEPS, step, jnp.ones((1, 1, c.hidden_size)))

    return jax.jit(run)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, and no stray arguments
    params = jax.block_until_ready(model.init_params(CONFIG, jax.random.key(0)))
    per_layer = model.unstack_layers(params)["layers"]
    print(f"jax {jax.__version__} ({jax.default_backend()}), ~100M shape, batch 1, ms per step:")
    for mode in ("scan", "static slices", "per-layer arrays"):
        layers = per_layer if mode == "per-layer arrays" else params["layers"]
        fn = bare_loop(mode)
        ms = best_ms_per_step(lambda: jax.block_until_ready(fn(layers, params["embed"])))
        print(f"  bare loop, {mode}: {ms:.1f}", flush=True)
    prompt = [list(range(3, 3 + 16))]
    for per_layer_weights in (False, True):
        decoder = Decoder(CONFIG, params, num_pages=20, page_size=16, per_layer_weights=per_layer_weights)
        settings = decoder.settings(STEPS)
        ms = best_ms_per_step(lambda: decoder.generate(prompt, settings))
        print(f"  Decoder, per_layer_weights={per_layer_weights}: {ms:.1f}", flush=True)


if __name__ == "__main__":
    main()
