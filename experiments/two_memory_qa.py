"""Do memories compose? Questions that need two memories, read with and without memory priors.

The demo world's multi-hop queries ("Which colour does the mentor of Lobaven like best?") need
two documents: the bridge (Lobaven's: "The mentor of Lobaven is Liven.") and the answer's
(Liven's: "... Loves the colour green."). For a `grc_jax.train` workdir that trained on the demo
world, prints exact match of the two-hop question read with:

- no memory (these people are trained ones: what the weights alone know), the bridge alone, the
  answer's memory alone;
- both memories (bridge first), both among 2 random distractor memories, and the answer's memory
  among 2 random ones without the bridge (what the bridge adds when the answer's memory is not
  the only candidate);

each without priors and under priors at several temperatures (`--temperatures`; the prior is
log_softmax(cos(question, memory) / T) over the memories a reader sees, docs/design.md section 8),
the question embedded three ways: plain; self-reasoned (`Engine.embed(..., reason=True)`: the
model writes "The mentor of Lobaven is ..." first, as multi-hop retrieval does); and with the gold
reasoning (an upper bound for the self-reasoned one).
As a control, the one-hop question about the answer's person with 4 random distractors, under
the same temperatures: a temperature that lets two memories through must not blend distractors
into one-hop answers.

    python experiments/two_memory_qa.py runs/tiny [--step N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402

from grc_jax.eval.data import load_jsonl  # noqa: E402
from grc_jax.eval.world import (  # noqa: E402
    answer_exact_match,
    document_tokens,
    prior_values,
    query_tokens,
    reader_tokens,
)
from grc_jax.inference import Engine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", type=Path)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.05, 0.2, 1.0])
    p.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = p.parse_args()
    engine = Engine.from_pretrained(args.workdir, step=args.step)
    world = args.workdir / "demo_world"
    tok, config, P = engine.tokenizer, engine.config, engine.config.max_segment_len
    latent_ids = list(engine.latent_ids)
    records = [r for r in load_jsonl(world / "multihop_eval.jsonl") if r.get("reasoning") and r.get("answer")]
    corpus = [d["text"] for d in load_jsonl(world / "corpus_train.jsonl")]
    rng = np.random.default_rng(0)

    bridges = [next(n for n in r["negatives"] if r["reasoning"] in n) for r in records]
    answers = [r["positive"] for r in records]

    def randoms(exclude: list[str], count: int) -> list[str]:
        pool = [t for t in corpus if t not in exclude]
        return [pool[i] for i in rng.choice(len(pool), count, replace=False)]

    two_hop = [reader_tokens(tok, r["query"], r["answer"], engine.eos_id) for r in records]
    one_hop = [reader_tokens(tok, r["question"], r["answer"], engine.eos_id) for r in records]
    contexts = {
        "none": [[] for _ in records],
        "bridge alone": [[b] for b in bridges],
        "answer's memory alone": [[a] for a in answers],
        "both": [[b, a] for b, a in zip(bridges, answers)],
        "both + 2 random": [[b, a] + randoms([b, a], 2) for b, a in zip(bridges, answers)],
        "answer's memory + 2 random": [[a] + randoms([b, a], 2) for b, a in zip(bridges, answers)],
    }
    one_hop_context = [[a] + randoms([a], 4) for a in answers]

    def embed(texts: list[str]) -> np.ndarray:
        return engine.embed_tokens([document_tokens(tok, t, P) for t in texts]) if texts else np.zeros((0, 1))

    queries = {
        "plain": engine.embed_tokens([q[:P] for q, _ in two_hop]),
        "self-reasoned": engine.embed_with_reasoning_tokens([tok.encode(r["query"]) for r in records])[0],
        "gold reasoning": engine.embed_tokens(
            [query_tokens(tok, r["query"], r["reasoning"], engine.eor_id)[:P] for r in records]
        ),
    }
    one_hop_queries = engine.embed_tokens([q[:P] for q, _ in one_hop])

    def exact_match(readers, rows, questions=None, temperature=None) -> float:
        segs = [[document_tokens(tok, t, P) for t in row] for row in rows]
        values = None
        if temperature is not None:
            values = [prior_values(q, embed(row), temperature) for q, row in zip(questions, rows)]
        return answer_exact_match(config, engine.params, segs, readers, latent_ids, memory_priors=values)

    figures: dict[str, dict[str, float]] = {}
    for name, rows in contexts.items():
        row = figures[f"two-hop, {name}"] = {"no prior": exact_match(two_hop, rows)}
        if len(rows[0]) > 1:
            for source, questions in queries.items():
                for t in args.temperatures:
                    row[f"{source} prior T={t:g}"] = exact_match(two_hop, rows, questions, t)
    row = figures["one-hop, answer's memory + 4 random"] = {"no prior": exact_match(one_hop, one_hop_context)}
    for t in args.temperatures:
        row[f"plain prior T={t:g}"] = exact_match(one_hop, one_hop_context, one_hop_queries, t)

    print(f"{len(records)} two-hop questions (trained people), {args.workdir}")
    for name, row in figures.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
