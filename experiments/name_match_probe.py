"""The skill the held-out memory-QA figure needs, stripped bare: pick a memory by a name never seen before.

    python experiments/name_match_probe.py --memories 5 --queries 5 --steps 1500 [--plain]

Each example has --memories one-line documents `[name] = [value]`, each followed by --filler
random tokens (a name is --syllables tokens drawn from 80, a value one of 40 tokens, all drawn
anew for every example, so nothing can be learnt by heart), and a reader that asks `[name] ?`
(or `? [name]` with --name-last) for --queries of them, each followed by the value. The loss is
on the answer tokens only (the values, or the name for --name-task examples). With --plain the
documents are ordinary context (all READER tokens, a plain causal LM) instead of memories, to
tell the memory layout apart from the skill itself. With --name-task F, a share F of the
training examples (none held out) ask a lone memory `[WHO]` and are answered with its name, so
that the memories learn to hold names; the training accuracy then counts both kinds.

The model is the tiny demo's shape by default (hidden 128, 4 heads, 2 KV heads, --layers,
--architecture Qwen3, K = --latents = 8); --hidden H gives H/32 heads and H/64 KV heads.
Every 100 steps it prints the value accuracy on a training batch and on 256 fixed held-out
examples. A reader that cannot match names can still answer a later query of the same example
by elimination (values are distinct), so with Q = M queries its ceiling without matching is the
mean of 1/M, 1/(M-1), ..., 1 (printed as "no matching").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grc_jax import layout, model  # noqa: E402
from grc_jax.config import ModelConfig  # noqa: E402

from memory_probe import reader_training, stack_rows  # noqa: E402  (this folder)

SYLLABLES = range(100, 180)
VALUES = range(200, 240)
FILLER = range(10, 90)
ASK, EQUALS, EOS, WHO = 5, 6, 2, 7
P = 64


def example(
    rng: np.random.Generator, args: argparse.Namespace, name_task: float = 0.0
) -> tuple[list[list[int]], list[int], list[int]]:
    """Documents, the reader's tokens and the reader positions that hold an answer token.

    With probability `name_task` the example is instead one memory and `[WHO]`, answered with
    the memory's name: nothing to pick, it only teaches the memory to hold the name."""
    names = [[int(t) for t in rng.choice(SYLLABLES, args.syllables)] for _ in range(args.memories)]
    values = [int(v) for v in rng.choice(VALUES, args.memories, replace=False)]
    documents = [name + [EQUALS, value] for name, value in zip(names, values)]
    if args.filler:
        documents = [d + [int(t) for t in rng.choice(FILLER, args.filler)] for d in documents]
    if name_task and rng.random() < name_task:
        return documents[:1], [WHO] + names[0] + [EOS], list(range(1, 1 + len(names[0])))
    reader, answers = [], []
    for t in rng.permutation(args.memories)[: args.queries]:
        reader += [ASK] + names[t] if args.name_last else names[t] + [ASK]
        answers.append(len(reader))
        reader.append(values[t])
    return documents, reader + [EOS], answers


def batch(
    rng: np.random.Generator,
    size: int,
    length: int,
    latent_ids: list[int],
    args: argparse.Namespace,
    name_task: float = 0.0,
) -> tuple[jax.Array, ...]:
    rows, weights = [], []
    for _ in range(size):
        documents, reader, answers = example(rng, args, name_task)
        if args.plain:
            pieces = layout.example_pieces([], [t for d in documents for t in d] + reader, latent_ids, P)
        else:
            pieces = layout.example_pieces(documents, reader, latent_ids, P)
        rows.append(layout.pack_rows([pieces], length)[0])
        start = sum(len(t) for _, _, t in pieces) - len(reader)
        weight = np.zeros(length, np.float32)
        weight[[start + a - 1 for a in answers]] = 1.0  # the positions that predict each answer token
        weights.append(weight)
    return stack_rows(rows, weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memories", type=int, default=5)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--syllables", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128, help="hidden size; heads of 32, MLP 3x")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--architecture",
        choices=("Qwen3ForCausalLM", "LlamaForCausalLM"),
        default="Qwen3ForCausalLM",
        help="Qwen3 has q/k norms, Llama does not",
    )
    parser.add_argument("--tie", action="store_true", help="tied input and output embeddings, as the training defaults")
    parser.add_argument("--init", type=float, default=0.02, help="std of the random init (initializer_range)")
    parser.add_argument("--plain", action="store_true", help="documents as plain context, not memories")
    parser.add_argument(
        "--filler", type=int, default=0, help="random filler tokens after each value, for documents of realistic length"
    )
    parser.add_argument(
        "--name-task",
        type=float,
        default=0.0,
        help="share of training examples that ask a lone memory for its name (held-out: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the init and of the training examples")
    parser.add_argument("--latents", type=int, default=8, help="meta latent tokens per memory (K)")
    parser.add_argument(
        "--name-last", action="store_true", help="ask `? [name]`, so that the name's last token predicts the value"
    )
    args = parser.parse_args()
    if not 1 <= args.queries <= args.memories:
        parser.error(f"--queries must be in 1..--memories={args.memories}, got {args.queries}")
    if not 0 <= args.name_task < 1:
        parser.error(f"--name-task must be in [0, 1), got {args.name_task}")
    if args.name_task and args.plain:
        parser.error("--name-task needs memories: with --plain the name is in the reader's context")
    if args.latents < 1:
        parser.error(f"--latents must be >= 1, got {args.latents}")
    if args.filler < 0:
        parser.error(f"--filler must be >= 0, got {args.filler}")
    if args.syllables + 2 + args.filler > P:
        parser.error(f"a document of --syllables + 2 + --filler tokens must fit the segment length {P}")

    config = ModelConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 32,
        num_kv_heads=args.hidden // 64,
        head_dim=32,
        num_latents=args.latents,
        max_segment_len=P,
        architecture=args.architecture,
        qk_norm=args.architecture == "Qwen3ForCausalLM",
        initializer_range=args.init,
        tie_word_embeddings=args.tie,
    )
    latent_ids = list(config.latent_token_ids)
    document_len = args.syllables + 2 + args.filler
    length = args.memories * (document_len + config.num_latents) + args.queries * (args.syllables + 2) + 8
    step, evaluate, optimizer = reader_training(config, args.lr)
    params = model.init_params(config, jax.random.key(args.seed))
    opt_state = optimizer.init(params)
    # Seed 0 draws what the runs in RESULTS.md drew; another seed must not draw the held-out stream (1).
    rng = np.random.default_rng(0 if args.seed == 0 else (args.seed, 0))
    held = batch(np.random.default_rng(1), 256, length, latent_ids, args)
    no_matching = float(np.mean([1 / (args.memories - i) for i in range(args.queries)]))
    print(
        f"{'plain context' if args.plain else 'memories'}: hidden {args.hidden}, {args.layers} layers, "
        f"{args.architecture}, {'tied' if args.tie else 'untied'} embeddings, init std {args.init}, "
        f"{args.memories} documents{f' with {args.filler} filler tokens' if args.filler else ''}, "
        f"{args.queries} queries each, {args.syllables}-syllable names{' asked last' if args.name_last else ''}"
        f"{f', name task on {args.name_task:.0%} of training examples' if args.name_task else ''}; "
        f"without matching at most {no_matching:.2f}"
    )
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        rows = batch(rng, args.batch, length, latent_ids, args, args.name_task)
        params, opt_state, loss, accuracy = step(params, opt_state, *rows)
        if i % 100 == 0:
            print(
                f"step {i}: train loss {float(loss):.2f} accuracy {float(accuracy):.2f} | held-out accuracy "
                f"{float(evaluate(params, *held)[1]):.2f} | {time.perf_counter() - start:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
