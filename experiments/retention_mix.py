"""Builds a retention mixture for GRC-tuning a pretrained chat model: general text it keeps seeing.

Two JSONL files of `text` records (generative loss only), to mix with the demo world through
`--config.data.mixture`:
- `chat.jsonl`: the base model's own greedy answers to general questions (templates x topics
  below, none of them one of `lm_retention.QUESTIONS`), each rendered with the model's chat
  template: the tuned model keeps seeing how it answered before tuning (self-distillation);
- `text.jsonl`: English prose from the docstrings of Python standard-library modules, cut into
  passages of about `--passage-chars` characters. `pydoc_data` (the perplexity set of
  `lm_retention.py`) is never read; the two are the same domain (Python documentation), which
  `benchmarks/RESULTS.md` says where it reports the perplexity.

With `--world DIR` (a demo world, `python -m grc_jax.data.demo_world --out DIR`) it also writes
`qa.jsonl`: the world's training records that hold a question (query, documents, question and
answer), without its bare `text` records, so that a mixture can weight the records that train
reading and retrieval apart from the world's plain sentences.

    python experiments/retention_mix.py "$(python -m grc_jax.assets smollm2)" --out runs/retention_mix \\
        [--world runs/world]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grc_jax.inference import Engine  # noqa: E402

TEMPLATES = (
    "Explain what {} is in two sentences.",
    "Give me three facts about {}.",
    "Write a short paragraph about {}.",
    "Why is {} important?",
    "Describe {} to a ten-year-old.",
)
TOPICS = (
    "photosynthesis",
    "volcanoes",
    "the moon",
    "bicycles",
    "chess",
    "bread",
    "rain",
    "gravity",
    "the internet",
    "elephants",
    "music",
    "friendship",
    "the human heart",
    "electricity",
    "democracy",
    "coffee",
    "deserts",
    "the Roman Empire",
    "vaccines",
    "recycling",
    "honey bees",
    "mountains",
    "the solar system",
    "libraries",
    "exercise",
    "sleep",
    "trees",
    "rivers",
    "money",
    "mathematics",
    "poetry",
    "the printing press",
    "glaciers",
    "wind power",
    "the alphabet",
    "dinosaurs",
    "cooking",
    "bridges",
    "clouds",
    "the brain",
    "cats",
    "soccer",
    "gardening",
    "batteries",
    "earthquakes",
    "the Olympic Games",
    "penguins",
    "maps",
    "telescopes",
    "salt",
)
MODULES = (
    "abc",
    "argparse",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "csv",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "html",
    "http.client",
    "inspect",
    "io",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "math",
    "multiprocessing",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
)


def questions() -> list[str]:
    return [t.format(topic) for topic in TOPICS for t in TEMPLATES]


def chat_records(model: str, max_new_tokens: int, batch_size: int) -> list[dict]:
    engine = Engine.from_pretrained(model, batch_size=batch_size)
    prompts = [engine.render_chat([{"role": "user", "content": q}]) for q in questions()]
    answers = [whole_sentences(a) for a in engine.generate(prompts, max_new_tokens=max_new_tokens)]
    # The builder ends a text record with eos (<|im_end|>), where the model's own turn ends.
    return [{"text": p + a} for p, a in zip(prompts, answers) if a]


def whole_sentences(answer: str, shortest: int = 40) -> str:
    """The answer cut after its last whole sentence (an answer cut at max_new_tokens would teach
    the model to end its turn mid-sentence); "" when that leaves fewer than `shortest` characters."""
    answer = answer.strip()
    if re.search(r'[.!?)"]$', answer):
        return answer
    end = max(answer.rfind(". "), answer.rfind(".\n"), answer.rfind("! "), answer.rfind("? "))
    return answer[: end + 1] if end >= shortest else ""


def docstrings() -> list[str]:
    """Docstrings of the modules and their public classes and functions, long ones only, in order."""
    docs: list[str] = []
    for name in MODULES:
        module = importlib.import_module(name)
        objects = [module] + [getattr(module, a) for a in sorted(vars(module)) if not a.startswith("_")]
        for obj in objects:
            if inspect.ismodule(obj) and obj is not module:
                continue
            doc = inspect.getdoc(obj) if (obj is module or inspect.isclass(obj) or inspect.isroutine(obj)) else None
            if doc and len(doc) >= 400 and doc not in docs:
                docs.append(doc)
    return docs


def passages(texts: list[str], chars: int) -> list[str]:
    """Texts cut at paragraph breaks into passages of about `chars` characters."""
    out = []
    for text in texts:
        current = ""
        for para in text.split("\n\n"):
            if current and len(current) + len(para) > chars:
                out.append(current)
                current = ""
            current = f"{current}\n\n{para}" if current else para
        if len(current) >= 200:
            out.append(current)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the base model (anything Engine.from_pretrained opens)")
    p.add_argument("--out", type=Path, required=True, help="directory for chat.jsonl and text.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--passage-chars", type=int, default=1500)
    p.add_argument("--world", type=Path, default=None, help="a demo world: write its question records as qa.jsonl")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.world is not None:
        lines = (args.world / "train.jsonl").read_text().splitlines(keepends=True)
        qa = [line for line in lines if "question" in json.loads(line)]
        (args.out / "qa.jsonl").write_text("".join(qa))
        print(f"qa.jsonl: {len(qa)} of the world's {len(lines)} records", flush=True)
    text = [{"text": t} for t in passages(docstrings(), args.passage_chars)]
    (args.out / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    print(f"text.jsonl: {len(text)} passages", flush=True)
    start = time.time()
    chat = chat_records(args.model, args.max_new_tokens, args.batch_size)
    (args.out / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    print(f"chat.jsonl: {len(chat)} answers in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
