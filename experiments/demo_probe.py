"""Where a tiny demo run falls short. Reads a `grc_jax.train` workdir that trained on the demo
world and prints:

- memory QA exact match on the held-out questions with 0, 1, 2 and 4 distractor memories, drawn
  as the evaluation draws them (the hardest negatives first) and at random: reading a memory,
  picking one by name, or blending them; and the same on 96 trained people's questions (and with
  no memory), where a reader may pick memories by names it has learnt;
- where the reader looks: in every layer past the first (the first sees the same latent K/V
  for every memory), the share of each head's attention to memories that goes to the right
  one, at the position that predicts the answer;

and, for held-out and for trained multi-hop queries:

- how often the greedy self-reasoning trace (as `Engine.embed(..., reason=True)` makes it)
  equals the gold reasoning, and how often it names the gold bridge;
- how often the bare text prefix of the gold reasoning ("The mentor of X is") is completed
  with the bridge's name: the fact as plain language modelling, without the query.

    python experiments/demo_probe.py /tmp/official/run2 [--queries 30]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from grc_jax import layout  # noqa: E402
from grc_jax.eval.attention import attention_probabilities  # noqa: E402
from grc_jax.eval.data import load_jsonl  # noqa: E402
from grc_jax.eval.distractors import with_distractors  # noqa: E402
from grc_jax.eval.world import answer_exact_match, document_tokens, reader_tokens  # noqa: E402
from grc_jax.inference import Engine  # noqa: E402


def memory_qa_by_distractors(
    engine: Engine,
    world: Path,
    counts: tuple[int, ...] = (0, 1, 2, 4),
    look_alikes: bool = True,
    split: str = "heldout",
) -> dict[int, float]:
    """Exact match with each number of distractors: the record's negatives first, as
    `grc_jax.eval.world` draws them (look-alikes in the demo world), or random documents only.
    A count of -1 gives the reader no memory at all."""
    tok, config = engine.tokenizer, engine.config
    qa, corpus = _questions(world, split)
    readers = [reader_tokens(tok, r["question"], r["answer"], engine.eos_id) for r in qa]
    out = {}
    for count in counts:
        rng = np.random.default_rng(0)
        memories = [
            [
                document_tokens(tok, t, config.max_segment_len)
                for t in _draw_memories(r, count, look_alikes, corpus, rng)
            ]
            if count >= 0
            else []
            for r in qa
        ]
        out[count] = answer_exact_match(config, engine.params, memories, readers, list(config.latent_token_ids))
    return out


TRAINED_QUESTIONS = 96


def _questions(world: Path, split: str = "heldout") -> tuple[list[dict], list[str]]:
    """A split's direct memory-QA records (no multi-hop ones) with a one-word answer, the first
    TRAINED_QUESTIONS of them for "train"; and the split's documents, which random distractors
    come from."""
    qa = [
        r
        for r in load_jsonl(world / f"{split}.jsonl")
        if {"question", "answer", "positive"} <= r.keys() and "reasoning" not in r and len(r["answer"].split()) == 1
    ]
    corpus = [d["text"] for d in load_jsonl(world / f"corpus_{split}.jsonl")]
    return qa[:TRAINED_QUESTIONS] if split == "train" else qa, corpus


def _draw_memories(r: dict, count: int, look_alikes: bool, corpus: list[str], rng: np.random.Generator) -> list[str]:
    """The positive and `count` distractors, shuffled, drawn as the held-out evaluation draws them."""
    return with_distractors(r["positive"], r.get("negatives", []), corpus, count, rng, look_alikes)


_attention_probs = jax.jit(attention_probabilities, static_argnums=0)


def attention_on_right_memory(engine: Engine, world: Path, count: int, look_alikes: bool = True) -> np.ndarray:
    """[layers - 1, heads]: mean over held-out questions of the share of the attention to memory
    latents that goes to the right memory's latents, at the position predicting the answer."""
    tok, config, params = engine.tokenizer, engine.config, engine.params
    qa, corpus = _questions(world)
    rng = np.random.default_rng(0)
    shares = []
    for r in qa:
        texts = _draw_memories(r, count, look_alikes, corpus, rng)
        question, answer = reader_tokens(tok, r["question"], r["answer"], engine.eos_id)
        row = layout.example_row(
            [document_tokens(tok, t, config.max_segment_len) for t in texts],
            question + answer,
            config.latent_token_ids,
            config.max_segment_len,
        )
        at = len(row.tokens) - len(answer) - 1  # the last question token predicts the answer
        meta = layout.TokenMeta(*(jnp.asarray(a[None]) for a in (row.example, row.segment, row.kind)))
        probs = np.asarray(_attention_probs(config, params, jnp.asarray(row.tokens[None]), meta))
        right = row.latent_index[texts.index(r["positive"])]
        latents = row.latent_index.reshape(-1)
        weights = probs[1:, 0, :, at, :]  # [layers - 1, heads, keys]
        shares.append(weights[..., right].sum(-1) / weights[..., latents].sum(-1))
    return np.mean(shares, axis=0)


def probe(engine: Engine, records: list[dict]) -> tuple[dict[str, float], list[str]]:
    """The figures for these multi-hop records, and the model's trace for each."""
    tok = engine.tokenizer
    _, traces = engine.embed_with_reasoning_tokens([tok.encode(r["query"]) for r in records])
    texts = [tok.decode([t for t in ids if t != engine.eor_id]).strip() for ids in traces]
    heads, bridges = zip(*(r["reasoning"].rsplit(" is ", 1) for r in records))
    bridges = [b.rstrip(".") for b in bridges]
    completions = engine.decoder.generate([tok.encode(h + " is") for h in heads], engine.decoder.settings(8))
    n = len(records)
    return {
        "trace equals gold reasoning": sum(t == r["reasoning"] for t, r in zip(texts, records)) / n,
        "trace names the bridge": sum(t.endswith(f" is {b}.") for t, b in zip(texts, bridges)) / n,
        "text prefix completed with the bridge": sum(
            tok.decode(c).strip().startswith(b + ".") for c, b in zip(completions, bridges)
        )
        / n,
    }, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--queries", type=int, default=30, help="multi-hop queries per split")
    parser.add_argument("--show", type=int, default=5, help="held-out traces to print")
    args = parser.parse_args()
    world = Path(args.workdir) / "demo_world"
    engine = Engine.from_pretrained(args.workdir)
    for look_alikes in (True, False):
        figures = memory_qa_by_distractors(engine, world, look_alikes=look_alikes)
        print(
            f"memory QA exact match, {'look-alike' if look_alikes else 'random'} distractors: "
            + ", ".join(f"{n}: {v:.3f}" for n, v in figures.items())
        )
        counts = (-1, 0, 4) if look_alikes else (0, 4)
        figures = memory_qa_by_distractors(engine, world, counts, look_alikes, split="train")
        print(
            f"  trained people, {'look-alike' if look_alikes else 'random'} distractors: "
            + ", ".join(f"{'no memory' if n < 0 else n}: {v:.3f}" for n, v in figures.items())
        )
    for count in (1, 4):
        shares = attention_on_right_memory(engine, world, count)
        print(
            f"share of attention to memories on the right one, {count} look-alike distractor(s) "
            f"(chance {1 / (count + 1):.2f}), per layer past the first, per head: "
            + "; ".join(" ".join(f"{v:.2f}" for v in layer) for layer in shares)
        )
    splits = {
        "held-out (multihop_eval.jsonl)": load_jsonl(world / "multihop_eval.jsonl")[: args.queries],
        "trained (train.jsonl)": [r for r in load_jsonl(world / "train.jsonl") if "reasoning" in r][: args.queries],
    }
    for name, records in splits.items():
        if not records:
            continue
        figures, traces = probe(engine, records)
        print(f"{name}, {len(records)} queries: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
        if name.startswith("held-out"):
            for r, trace in list(zip(records, traces))[: args.show]:
                print(f"  gold {r['reasoning']!r} | model {trace!r}")


if __name__ == "__main__":
    main()
