"""Does GRC tuning leave a pretrained model a language model? Perplexity and fixed answers.

For each model path (anything `Engine.from_pretrained` opens: the base GGUF or HF directory, a
training run), prints and records:
- perplexity of the plain causal LM (no latents, no memories) on natural text: by default the
  Python language reference's topic texts that CPython ships (`pydoc_data.topics`: technical
  English prose, never part of the demo world), cut into non-overlapping 512-token windows
  (`grc_jax.eval.perplexity`);
- the greedy chat answers to a few fixed general questions (the model's own chat template).

    python experiments/lm_retention.py "$(python -m grc_jax.assets smollm2)" runs/smollm2 \
        --out retention.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grc_jax.eval.perplexity import perplexity, text_windows  # noqa: E402
from grc_jax.inference import Engine  # noqa: E402

QUESTIONS = (
    "What is the capital of France?",
    "What is 12 times 7?",
    "Name three primary colors.",
    "Explain in one sentence what a CPU does.",
    "Write a short sentence about the sea.",
)


def reference_texts() -> list[str]:
    """The Python language reference's topic texts, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def evaluate(path: str, window: int, max_tokens: int, max_new_tokens: int) -> dict:
    engine = Engine.from_pretrained(path)
    windows = text_windows(engine.tokenizer, reference_texts(), window, max_tokens)
    figures = perplexity(engine.config, engine.params, windows)
    answers = {q: engine.chat([{"role": "user", "content": q}], max_new_tokens=max_new_tokens) for q in QUESTIONS}
    return {"perplexity": figures, "answers": answers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model paths: the base first, then tuned runs")
    p.add_argument("--window", type=int, default=512, help="tokens per scored window")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens of text scored in all")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args()
    results = {}
    for path in args.models:
        results[path] = r = evaluate(path, args.window, args.max_tokens, args.max_new_tokens)
        ppl = r["perplexity"]
        print(f"{path}: perplexity {ppl['perplexity']:.3f} over {ppl['tokens_scored']} tokens", flush=True)
        for q, a in r["answers"].items():
            print(f"  Q: {q}\n  A: {a!r}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
