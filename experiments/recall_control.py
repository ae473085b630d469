"""A control for name_match_probe.py: the same bare skill learnt by a vanilla transformer with no grc_jax code.

    python experiments/recall_control.py --memories 2 --queries 2 --init 0.088 --steps 3000

Each example is plain context: --memories pairs `[name] = [value]` (one-token names from 80,
values from 40, both drawn anew for every example), then --queries questions `[name] ?` each
followed by its value (distinct names, so later questions can be answered by elimination). The
model is a 2-layer pre-norm transformer of width --hidden with 4 heads, learned positions (or
--rope [BASE]), a GELU MLP and tied embeddings; every weight starts as normal(0, --init). Every
100 steps it prints the value accuracy on a training batch and on 256 fixed held-out examples.
Without matching names the ceiling is the mean of 1/M, 1/(M-1), ..., for the queries asked.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

NAMES, VALUES, ASK, EQUALS, VOCAB, HEADS, LAYERS = np.arange(100, 180), np.arange(200, 240), 5, 6, 256, 4, 2


def batch(rng: np.random.Generator, size: int, memories: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows and a weight on each position that predicts a value."""
    tokens, weights = [], []
    for _ in range(size):
        names = rng.choice(NAMES, memories, replace=False)
        values = rng.choice(VALUES, memories, replace=False)
        row = [t for pair in zip(names, [EQUALS] * memories, values) for t in pair]
        weight = np.zeros(3 * (memories + queries), np.float32)
        for i in rng.permutation(memories)[:queries]:
            row += [names[i], ASK]
            weight[len(row) - 1] = 1.0
            row.append(values[i])
        tokens.append(row)
        weights.append(weight)
    return np.asarray(tokens), np.stack(weights)


def init(key: jax.Array, hidden: int, length: int, std: float) -> dict:
    keys = iter(jax.random.split(key, 2 + 6 * LAYERS))

    def normal(*shape):
        return std * jax.random.normal(next(keys), shape)

    layer = lambda: {
        "q": normal(hidden, hidden),
        "k": normal(hidden, hidden),
        "v": normal(hidden, hidden),
        "o": normal(hidden, hidden),
        "up": normal(hidden, 3 * hidden),
        "down": normal(3 * hidden, hidden),
    }
    return {
        "embed": normal(VOCAB, hidden),
        "position": normal(length, hidden),
        "layers": [layer() for _ in range(LAYERS)],
    }


def rms_norm(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def rotate(x: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding over [batch, length, heads, dim], half-split pairs, base `theta`."""
    half = x.shape[-1] // 2
    angles = jnp.arange(x.shape[1])[:, None] * theta ** (-jnp.arange(half) / half)
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def logits(params: dict, tokens: jax.Array, rope_theta: float | None = None) -> jax.Array:
    """With `rope_theta`, rotary positions of that base instead of the learned position table."""
    batch_size, length = tokens.shape
    x = params["embed"][tokens] + (0.0 if rope_theta is not None else params["position"][None])
    causal = jnp.tril(jnp.ones((length, length), bool))
    for p in params["layers"]:
        h = rms_norm(x)
        q, k, v = (jnp.reshape(h @ p[n], (batch_size, length, HEADS, -1)) for n in "qkv")
        if rope_theta is not None:
            q, k = rotate(q, rope_theta), rotate(k, rope_theta)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        probs = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        x = x + jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape) @ p["o"]
        x = x + jax.nn.gelu(rms_norm(x) @ p["up"]) @ p["down"]
    return rms_norm(x) @ params["embed"].T


def loss_fn(
    params: dict, tokens: jax.Array, weight: jax.Array, rope_theta: float | None = None
) -> tuple[jax.Array, jax.Array]:
    logp = jax.nn.log_softmax(logits(params, tokens, rope_theta))
    targets = jnp.roll(tokens, -1, axis=1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    hits = jnp.argmax(logp, axis=-1) == targets
    return (nll * weight).sum() / weight.sum(), (hits * weight).sum() / weight.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memories", type=int, default=5)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--init", type=float, default=0.02, help="std of every weight at init")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rope",
        type=float,
        nargs="?",
        const=10000.0,
        metavar="BASE",
        help="rotary positions on q and k (base 10000 unless given) instead of learned positions",
    )
    args = parser.parse_args()
    if not 1 <= args.queries <= args.memories:
        parser.error(f"--queries must be in 1..--memories={args.memories}, got {args.queries}")
    if args.rope is not None and not args.rope > 0:
        parser.error(f"--rope BASE must be > 0, got {args.rope}")

    optimizer = optax.adamw(args.lr, b1=0.9, b2=0.95, weight_decay=0.01)

    loss_and_accuracy = functools.partial(loss_fn, rope_theta=args.rope)

    @jax.jit
    def step(params, opt_state, tokens, weight):
        (loss, accuracy), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(params, tokens, weight)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    evaluate = jax.jit(loss_and_accuracy)
    params = init(jax.random.key(args.seed), args.hidden, 3 * (args.memories + args.queries), args.init)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(args.seed)
    held = batch(np.random.default_rng(10_000 + args.seed), 256, args.memories, args.queries)
    no_matching = float(np.mean([1 / (args.memories - i) for i in range(args.queries)]))
    positions = "learned positions" if args.rope is None else f"RoPE base {args.rope:g}"
    print(
        f"vanilla transformer: {positions}, hidden {args.hidden}, "
        f"init std {args.init}, lr {args.lr}, {args.memories} pairs, {args.queries} queries; "
        f"without matching at most {no_matching:.2f}"
    )
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        examples = batch(rng, args.batch, args.memories, args.queries)
        params, opt_state, loss, accuracy = step(params, opt_state, *examples)
        if i % 100 == 0:
            print(
                f"step {i}: train loss {float(loss):.2f} accuracy {float(accuracy):.2f} | held-out accuracy "
                f"{float(evaluate(params, *held)[1]):.2f} | {time.perf_counter() - start:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
