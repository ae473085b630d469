"""Does a trained model recall the bridge of a multi-hop query? Reads a `grc_jax.train` workdir
that trained on the demo world and prints, for held-out and for trained multi-hop queries:

- how often the greedy self-reasoning trace (as `Engine.embed(..., reason=True)` makes it)
  equals the gold reasoning, and how often it names the gold bridge;
- how often the bare text prefix of the gold reasoning ("The mentor of X is") is completed
  with the bridge's name: the fact as plain language modelling, without the query.

    python benchmarks/reasoning_probe.py /tmp/official/run2 [--queries 30]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grc_jax.eval.world import read_jsonl  # noqa: E402
from grc_jax.inference import Engine  # noqa: E402


def probe(engine: Engine, records: list[dict]) -> dict[str, float]:
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
            tok.decode(c).strip().startswith(b + ".") for c, b in zip(completions, bridges)) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--queries", type=int, default=30, help="multi-hop queries per split")
    parser.add_argument("--show", type=int, default=5, help="held-out traces to print")
    args = parser.parse_args()
    world = Path(args.workdir) / "demo_world"
    engine = Engine.from_pretrained(args.workdir)
    splits = {
        "held-out (multihop_eval.jsonl)": read_jsonl(world / "multihop_eval.jsonl")[: args.queries],
        "trained (train.jsonl)": [r for r in read_jsonl(world / "train.jsonl") if "reasoning" in r][: args.queries],
    }
    for name, records in splits.items():
        figures = probe(engine, records)
        print(f"{name}, {len(records)} queries: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    tok = engine.tokenizer
    shown = splits["held-out (multihop_eval.jsonl)"][: args.show]
    _, traces = engine.embed_with_reasoning_tokens([tok.encode(r["query"]) for r in shown])
    for r, ids in zip(shown, traces):
        print(f"  gold {r['reasoning']!r} | model {tok.decode([t for t in ids if t != engine.eor_id]).strip()!r}")


if __name__ == "__main__":
    main()
