"""Where does a reader given the right memory alone go wrong? Held-out questions by attribute.

For a `grc_jax.train` workdir trained on the demo world, compresses each held-out question's
right document into its memory, answers the question greedily reading that memory alone
(`Engine.generate`, the serving path), and prints exact match per attribute the question asks
about (pet, city, profession, colour), with each miss: the answer given, the right one, and
whether the answer given is another value the same document holds or a value it does not hold.

    python experiments/reader_misses.py runs/smollm2 [--step N] [--eval-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grc_jax.eval.data import load_jsonl  # noqa: E402
from grc_jax.inference import Engine  # noqa: E402

ATTRIBUTES = {  # a word of the question -> the attribute it asks about
    "pet": "pet",
    "live": "city",
    "city": "city",
    "profession": "profession",
    "living": "profession",
    "colour": "colour",
}


def attribute(question: str) -> str:
    words = re.findall(r"[a-z]+", question.lower())
    return next((ATTRIBUTES[w] for w in words if w in ATTRIBUTES), "other")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--eval-dir", type=Path, default=None, help="the demo world (default: RUN/demo_world)")
    p.add_argument("--out", type=Path, default=None, help="write per-question results here as JSON")
    args = p.parse_args()
    engine = Engine.from_pretrained(args.run, step=args.step)
    world = args.eval_dir or args.run / "demo_world"
    qa = [r for r in load_jsonl(world / "heldout.jsonl") if "question" in r and "answer" in r and "positive" in r]
    memories = engine.compress([r["positive"] for r in qa])
    answers = engine.generate([r["question"] for r in qa], memories=memories, max_new_tokens=8)
    rows, by_kind = [], collections.defaultdict(list)
    for record, given in zip(qa, answers):
        right = record["answer"]
        hit = given.strip() == right.strip()
        in_doc = (not hit) and bool(given.strip()) and given.strip().lower() in record["positive"].lower()
        kind = attribute(record["question"])
        by_kind[kind].append(hit)
        rows.append(dict(question=record["question"], right=right, given=given, hit=hit, kind=kind, in_doc=in_doc))
    print(f"{'attribute':<12} {'questions':>9} {'exact match':>11}")
    for kind, hits in sorted(by_kind.items()):
        print(f"{kind:<12} {len(hits):>9} {sum(hits) / len(hits):>11.3f}")
    total = [r["hit"] for r in rows]
    print(f"{'all':<12} {len(total):>9} {sum(total) / len(total):>11.3f}")
    for r in rows:
        if not r["hit"]:
            where = "another value of the same document" if r["in_doc"] else "not in the document"
            print(f"miss ({r['kind']}): {r['question']!r} -> {r['given']!r}, right {r['right']!r} ({where})")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
