"""Retention data: general text a pretrained chat model keeps seeing while it is GRC-tuned, so that
it stays a chat model and a language model (benchmarks/RESULTS.md: tuned on the demo world alone,
SmolLM2-135M-Instruct answers every chat question with demo-world sentences).

Two JSONL files of `text` records (generative loss only):
- `chat.jsonl`: the base model's own greedy answers to general questions (the templates x topics
  below), each rendered with the model's chat template, cut after the answer's last whole
  sentence: the tuned model keeps seeing how it answered before tuning (self-distillation);
- `prose.jsonl`: English prose from the docstrings of Python standard-library modules, cut at
  paragraph breaks into passages of about 1,500 characters. `pydoc_data` (the perplexity set of
  `experiments/lm_retention.py`) is never read.

Training builds them in WORKDIR/retention when `data.retention` is above 0 (grc_jax/train.py);
`python -m grc_jax.data.retention MODEL --out DIR` builds them for a `data.mixture` of your own.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from grc_jax import files
from grc_jax.inference import Engine

CHAT_FILE = "chat.jsonl"
PROSE_FILE = "prose.jsonl"

# General questions: 50 topics x 5 templates, none of them a question experiments/lm_retention.py asks.
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


def chat_records(model: str | Path, *, max_new_tokens: int = 96, batch_size: int = 16) -> list[dict[str, Any]]:
    """`text` records: each general question rendered with `model`'s chat template, followed by
    the model's greedy answer cut to whole sentences (answers with none left are dropped)."""
    engine = Engine.from_pretrained(model, batch_size=batch_size)
    if engine.chat_template is None:
        raise ValueError(f"{model}: data.retention needs a chat model, and this one has no chat template")
    prompts = [engine.render_chat([{"role": "user", "content": q}]) for q in questions()]
    answers = [whole_sentences(a) for a in engine.generate(prompts, max_new_tokens=max_new_tokens)]
    # The record builder ends a text record with eos, where the model's own turn ends.
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
    with warnings.catch_warnings():  # typing.io and typing.re warn when their docstrings are read
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in MODULES:
            module = importlib.import_module(name)
            objects = [module] + [getattr(module, a) for a in sorted(vars(module)) if not a.startswith("_")]
            for obj in objects:
                if inspect.ismodule(obj) and obj is not module:
                    continue
                readable = obj is module or inspect.isclass(obj) or inspect.isroutine(obj)
                doc = inspect.getdoc(obj) if readable else None
                if doc and len(doc) >= 400 and doc not in docs:
                    docs.append(doc)
    return docs


def passages(texts: list[str], chars: int = 1500) -> list[str]:
    """Texts cut at paragraph breaks into passages of about `chars` characters (a last piece
    under 200 characters is dropped)."""
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


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    files.atomic_write_bytes(path, data)


def build(
    out: str | Path,
    model: str | Path,
    *,
    max_new_tokens: int = 96,
    batch_size: int = 16,
    fits: Callable[[str], bool] = lambda text: True,
) -> dict[str, Path]:
    """Writes chat.jsonl and prose.jsonl into `out` (each atomically; a file already there is
    kept, so a killed build resumes where it stopped) and returns their paths by name. Texts
    for which `fits` is False (longer than a training row, say) are left out."""
    out = Path(out)
    paths = {"chat": out / CHAT_FILE, "prose": out / PROSE_FILE}
    if not paths["prose"].is_file():
        _write_jsonl(paths["prose"], [{"text": t} for t in passages(docstrings()) if fits(t)])
    if not paths["chat"].is_file():
        records = chat_records(model, max_new_tokens=max_new_tokens, batch_size=batch_size)
        records = [r for r in records if fits(r["text"])]
        if not records:
            raise ValueError(
                f"{model}: no answer of the base model to the {len(questions())} retention questions ends "
                "in a whole sentence; data.retention needs a chat model that answers them"
            )
        _write_jsonl(paths["chat"], records)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the base model (anything Engine.from_pretrained opens)")
    p.add_argument("--out", type=Path, required=True, help="directory for chat.jsonl and prose.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    start = time.time()
    paths = build(args.out, args.model, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    for name, path in paths.items():
        print(f"{path}: {sum(1 for _ in path.open())} {name} records", flush=True)
    print(f"built in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
