"""How fast a model trained from scratch learns to answer from a memory: the compressive loss alone.

    python experiments/memory_probe.py --world /tmp/demo_world --layers 2 --steps 1000

Trains a tiny GRC model (hidden 128, --latents K, default 8) on the demo world's one-word questions only:
each reader sees the positive's memory and --distractors others (--kind: the record's hard
negatives, those of them without the answer word, or random people), and the loss is on the
answer word. Every 50 steps it prints the answer-word accuracy on a training batch and on the
held-out questions (people never trained on), with the right memory alone, with 4 look-alike and
with 4 random distractors.
With --fresh, training questions are about people drawn anew for every question instead (half
the distractors look-alikes, half random), so no name can be learnt by heart; --alone-steps N
shows the right memory alone for the first N steps (a curriculum).
This is the skill the tiny demo's memory-QA figure needs, measured without the other two losses
competing for the steps. The world is written with `grc_jax.data.demo_world` defaults if
--world does not hold one.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grc_jax import layout, model  # noqa: E402
from grc_jax.config import ModelConfig  # noqa: E402
from grc_jax.data import demo_world  # noqa: E402
from grc_jax.eval.data import load_jsonl  # noqa: E402
from grc_jax.eval.world import document_tokens, reader_tokens  # noqa: E402
from grc_jax.tokenizer import Tokenizer  # noqa: E402

P, EOS = 64, 2


def one_word_questions(path: Path) -> list[dict]:
    return [r for r in load_jsonl(path) if "question" in r and "reasoning" not in r and len(r["answer"].split()) == 1]


@functools.cache
def _document_tokens(tok: Tokenizer, text: str) -> list[int]:
    return document_tokens(tok, text, P)


def pick_distractors(r: dict, how: str, count: int, pool: Sequence[str], rng: np.random.Generator) -> list[str]:
    """`count` distractor documents: the record's hard negatives ("lookalike"), those of them
    that do not contain the answer word ("differing"), or other people's documents ("random")."""
    if how == "lookalike":
        return r["negatives"][:count]
    if how == "differing":
        has_answer = [re.search(rf"\b{re.escape(r['answer'])}\b", n) is not None for n in r["negatives"]]
        return [n for _, n in sorted(zip(has_answer, r["negatives"]), key=lambda pair: pair[0])][:count]
    out: list[str] = []
    while len(out) < count:
        d = pool[rng.integers(len(pool))]
        if d != r["positive"] and d not in out:
            out.append(d)
    return out


def fresh_records(
    count: int, distractors: int, rng: np.random.Generator, pieces: set[str], avoid: set[str]
) -> list[dict]:
    """`count` one-word question records about people drawn now (seen once, never again), each
    with `distractors` other new people: every other one a look-alike (all attributes but one or
    two the same), the rest random. Names use only the world's name tokens (`pieces`) and none of
    its names (`avoid`)."""
    r = random.Random(int(rng.integers(2**63)))
    pre = demo_world.pre_tokenizer()

    def attributes() -> list[str]:
        return [r.choice(demo_world.ATTRIBUTE_VALUES[kind]) for kind in demo_world.ATTRIBUTES]

    out = []
    for _ in range(count):
        names: list[str] = []
        while len(names) < distractors + 2:  # the person, the distractors and their mentor
            n = demo_world._new_name(r, [m.lower() for m in names], pre, pieces)
            if n is not None and n.lower() not in avoid:
                names.append(n)
        values = attributes()
        people = [demo_world.Entity(names[0], "train", *values, mentor=names[-1])]
        for i, name in enumerate(names[1:-1]):
            other = list(values) if i % 2 == 0 else attributes()
            for j in r.sample(range(len(other)), r.choice((1, 2))):
                other[j] = r.choice(demo_world.ATTRIBUTE_VALUES[demo_world.ATTRIBUTES[j]])
            people.append(demo_world.Entity(name, "train", *other, mentor=names[-1]))
        kind = r.choice(demo_world.ATTRIBUTES)
        documents = [demo_world._document(r, e) for e in people]
        out.append(
            {
                "positive": documents[0],
                "negatives": documents[1:],
                "question": r.choice(demo_world._QUESTIONS[kind]).format(n=names[0]),
                "answer": people[0].attribute(kind),
            }
        )
    return out


def stack_rows(rows: Sequence[layout.Row], weights: Sequence[np.ndarray]) -> tuple[jax.Array, ...]:
    """Packed rows as the arguments of `reader_training`'s step: tokens, example, segment, kind,
    next-token targets and the loss weight of each position."""
    tokens = np.stack([row.tokens for row in rows])
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    meta = [np.stack([getattr(row, f) for row in rows]) for f in ("example", "segment", "kind")]
    return tuple(jnp.asarray(a) for a in (tokens, *meta, targets, np.stack(weights)))


def batch(
    records: list[dict],
    tok: Tokenizer,
    latent_ids: list[int],
    distractors: int,
    length: int,
    rng: np.random.Generator,
    how: str = "lookalike",
    pool: Sequence[str] = (),
) -> tuple[jax.Array, ...]:
    """Packed rows (one reader example each) and a weight on each row's answer word."""
    rows, weights = [], []
    for r in records:
        question, answer = reader_tokens(tok, r["question"], r["answer"], EOS)
        texts = [r["positive"]] + pick_distractors(r, how, distractors, pool, rng)
        rng.shuffle(texts)
        pieces = layout.example_pieces([_document_tokens(tok, t) for t in texts], question + answer, latent_ids, P)
        rows.append(layout.pack_rows([pieces], length)[0])
        end = sum(len(t) for _, _, t in pieces)
        weight = np.zeros(length, np.float32)
        weight[end - len(answer) - 1 : end - 2] = 1.0  # the positions predicting the answer word, not eos
        weights.append(weight)
    return stack_rows(rows, weights)


def reader_training(config: ModelConfig, lr: float) -> tuple[Callable, Callable, optax.GradientTransformation]:
    """A jitted training step and evaluation for a loss on weighted positions only (the readers'
    answers), returning (loss, accuracy) on them; and the AdamW optimizer the step uses."""
    optimizer = optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.01)

    def loss_fn(params, tokens, example, segment, kind, targets, weight):
        out = model.forward(config, params, tokens, layout.TokenMeta(example, segment, kind))
        logp = jax.nn.log_softmax(out.logits, axis=-1)  # all rows: targets include latent ids (weight 0)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        hits = jnp.argmax(logp, axis=-1) == targets
        return (nll * weight).sum() / weight.sum(), (hits * weight).sum() / weight.sum()

    @jax.jit
    def step(params, opt_state, *rows):
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *rows)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    return step, jax.jit(loss_fn), optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="/tmp/demo_world")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--distractors", type=int, default=0)
    parser.add_argument(
        "--kind",
        choices=("lookalike", "differing", "random"),
        default="lookalike",
        help="which distractor memories training readers see",
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--latents", type=int, default=8, help="meta latent tokens per memory (K)")
    parser.add_argument(
        "--alone-steps",
        type=int,
        default=0,
        help="for this many first steps readers see the right memory alone (a curriculum)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="train on people drawn anew for every question instead of the world's train people "
        "(their distractors are half look-alikes, half random: --kind does not apply)",
    )
    parser.add_argument("--qk-norm", action="store_true", help="Qwen3's q/k norms, as configs/tiny.py")
    args = parser.parse_args()

    world = Path(args.world)
    if not (world / "world.json").is_file():
        demo_world.write_demo_world(str(world))
    tok = Tokenizer.from_dir(world)
    train = one_word_questions(world / "train.jsonl")
    heldout = one_word_questions(world / "heldout.jsonl")
    config = ModelConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=384,
        num_layers=args.layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        num_latents=args.latents,
        max_segment_len=P,
        architecture="Qwen3ForCausalLM" if args.qk_norm else "LlamaForCausalLM",
        qk_norm=args.qk_norm,
    )
    K = config.num_latents
    latent_ids = list(config.latent_token_ids)
    doc_len = max(len(document_tokens(tok, r["positive"], P)) for r in train + heldout)
    length = (args.distractors + 1) * (doc_len + 8 + K) + 32  # + 8: new people's documents may be longer
    held_length = 5 * (doc_len + K) + 32
    train_pool = sorted({r["positive"] for r in train})
    held_pool = sorted({r["positive"] for r in heldout})
    world_names = [
        json.loads(line)["id"] for f in ("corpus_train.jsonl", "corpus_heldout.jsonl") for line in open(world / f)
    ]
    pre = demo_world.pre_tokenizer()
    pieces = {p for n in world_names for p in demo_world.name_pieces(n, pre)}
    avoid = {n.lower() for n in world_names}
    step, evaluate, optimizer = reader_training(config, args.lr)
    params = model.init_params(config, jax.random.key(0))
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(0)
    held = {
        how: batch(heldout, tok, latent_ids, 4, held_length, np.random.default_rng(1), how, held_pool)
        for how in ("lookalike", "random")
    }
    held["alone"] = batch(heldout, tok, latent_ids, 0, held_length, np.random.default_rng(1))
    print(
        f"{args.layers} layers, K = {K}, {'q/k norms, ' if args.qk_norm else ''}lr {args.lr}, "
        f"{args.distractors} {args.kind} distractor(s), {args.batch} questions/step, "
        f"documents up to {doc_len} tokens; {len(train)} training and {len(heldout)} held-out questions"
    )
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        distractors = 0 if i <= args.alone_steps else args.distractors
        if args.fresh:
            records = fresh_records(args.batch, distractors, rng, pieces, avoid)
            kind = "lookalike"
        else:
            records, kind = [train[j] for j in rng.integers(len(train), size=args.batch)], args.kind
        rows = batch(records, tok, latent_ids, distractors, length, rng, kind, train_pool)
        params, opt_state, loss, accuracy = step(params, opt_state, *rows)
        if i % 50 == 0:
            held_accuracy = {how: float(evaluate(params, *held_rows)[1]) for how, held_rows in held.items()}
            print(
                f"step {i}: train loss {float(loss):.2f} accuracy {float(accuracy):.2f} | held-out accuracy "
                f"with the right memory alone / 4 look-alike / 4 random distractors {held_accuracy['alone']:.2f} / "
                f"{held_accuracy['lookalike']:.2f} / {held_accuracy['random']:.2f} | "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
