"""Memory QA and RAG of a demo-world training run, with and without memory priors at reading.

For a `grc_jax.train` workdir (any checkpoint step) trained on the demo world, prints the
held-out figures of `grc_jax.eval.world.memory_qa_figures`: exact match with the right memory
alone, among 1 and 4 look-alikes and among 1 and 4 random distractors, with no memory, and RAG
end to end (the question searches every held-out memory; the reader reads the top 1 and top 4),
once reading without priors and once under priors (docs/design.md section 8), whatever the run
trained with. Writes the figures as JSON with --out.

    python benchmarks/memory_priors_eval.py /tmp/run [--step 400] [--prior-temperature 0.05]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402

from grc_jax.eval.data import load_jsonl  # noqa: E402
from grc_jax.eval.world import document_tokens, memory_qa_figures  # noqa: E402
from grc_jax.inference import Engine  # noqa: E402


def evaluate(
    run: Path, step: int | None, prior_temperature: float, limit: int, modes: tuple[bool, ...] = (False, True)
) -> dict[str, dict[str, float]]:
    engine = Engine.from_pretrained(run, step=step)  # special tokens from the run directory
    world = run / "demo_world"
    corpus = load_jsonl(world / "corpus_heldout.jsonl")
    heldout = load_jsonl(world / "heldout.jsonl")
    P = engine.config.max_segment_len
    docs = engine.embed_tokens([document_tokens(engine.tokenizer, d["text"], P) for d in corpus])
    return {
        ("priors" if on else "no_priors"): memory_qa_figures(
            engine, heldout, corpus, docs, limit, on, prior_temperature, np.random.default_rng(0)
        )
        for on in modes
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a grc_jax.train workdir trained on the demo world")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--prior-temperature", type=float, default=0.05, help="tau of the priors")
    p.add_argument("--max-queries", type=int, default=200)
    p.add_argument("--only", choices=("priors", "no_priors"), default=None, help="one reading mode only")
    p.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = p.parse_args()
    if not (args.run / "model_config.json").is_file() or not (args.run / "demo_world").is_dir():
        raise SystemExit(f"{args.run}: not a demo-world training workdir (model_config.json, demo_world/)")
    if args.prior_temperature <= 0:
        raise SystemExit(f"--prior-temperature must be > 0, got {args.prior_temperature}")
    modes = (False, True) if args.only is None else (args.only == "priors",)
    figures = evaluate(args.run, args.step, args.prior_temperature, args.max_queries, modes)
    for mode, values in figures.items():
        print(f"{mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()), flush=True)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
