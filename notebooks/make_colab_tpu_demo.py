"""Writes notebooks/colab_tpu_demo.ipynb from the cells below (edit here, then run this file)."""

from pathlib import Path

import nbformat

CELLS = [
    (
        "markdown",
        """# grc_jax on a Colab TPU: train, compress, embed, search, generate, RAG, export

One decoder LLM that, in a single forward pass, generates text, embeds text for retrieval and
compresses text into a few *meta latent tokens* whose K/V become a reusable memory.
This notebook trains the built-in tiny model on the synthetic demo world (on the TPU when the
runtime has one, else on the CPU), then uses it through `grc_jax.inference.Engine`, and
exports it to a directory that `transformers` loads.""",
    ),
    (
        "code",
        """# Settings. GRC_NOTEBOOK_SMOKE=1 (set by the project's test) shortens everything.
import os
SMOKE = os.environ.get("GRC_NOTEBOOK_SMOKE") == "1"
REPO = os.environ.get("GRC_REPO", "grc_jax")  # where the project is checked out
WORKDIR = os.environ.get("GRC_WORKDIR", "/content/grc_run" if os.path.isdir("/content") else "grc_run")""",
    ),
    (
        "code",
        """# Install. On Colab: clone the project next to this notebook first (or upload it), then install
# it; on a TPU runtime also install JAX's TPU build.
import importlib, subprocess, sys
if not SMOKE:
    if not os.path.isdir(REPO):
        raise SystemExit(f"put the grc_jax project at ./{REPO} (git clone or upload), then rerun")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", REPO], check=True)
    if "COLAB_TPU_ADDR" in os.environ or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio"):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "jax[tpu]"], check=True)
# A running kernel does not see a fresh editable install, and a checkout named ./grc_jax would
# otherwise be imported as an empty namespace package: put the checkout first on the path.
sys.path.insert(0, os.path.abspath(REPO))
importlib.invalidate_caches()""",
    ),
    (
        "code",
        """import jax
print("backend:", jax.default_backend(), "devices:", jax.device_count())""",
    ),
    (
        "markdown",
        """## Train the tiny config
The demo world (invented people with a city, a profession, a colour, a pet and a mentor) is
written into the work directory. One step trains the three objectives at once: generation on
the documents, InfoNCE between query and document embeddings, and answers read from memories.""",
    ),
    (
        "code",
        """import importlib.util
from grc_jax import train
spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs", "tiny.py"))
tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)
config = tiny.get_config()
if SMOKE:
    config.model.hidden_size, config.model.intermediate_size, config.model.num_layers = 32, 64, 2
    config.model.head_dim, config.model.num_latents, config.model.max_segment_len = 8, 4, 96
    config.data.demo_world_entities, config.data.demo_world_heldout, config.data.row_len = 40, 8, 448
    config.data.max_negatives, config.data.reader_distractors = 2, 2
    config.train.steps, config.log_every, config.checkpoint.every = 4, 2, 4
    config.eval_max_queries, config.reasoning_max_tokens = 8, 4
result = train.train_and_evaluate(config, WORKDIR)
result.get("eval")""",
    ),
    ("markdown", """## Serve it: compress, embed, search, generate with memories, RAG"""),
    (
        "code",
        """import json
from grc_jax.inference import Engine
engine = Engine.from_pretrained(WORKDIR)
corpus = [json.loads(line)["text"] for line in open(os.path.join(WORKDIR, "demo_world", "corpus_heldout.jsonl"))]
docs = corpus[: 8 if SMOKE else 48]
memory_ids = engine.compress(docs)               # one pass per document: its memory and its embedding
print(len(memory_ids), "documents ->", sum(len(m) for m in memory_ids), "memories of",
      engine.config.num_latents, "slots")""",
    ),
    (
        "code",
        """queries = engine.encode_query(["Who keeps an owl?", "Who lives in Quarn?"])
documents = engine.encode_document(docs[:4])
print(engine.similarity(queries, documents))""",
    ),
    (
        "code",
        """question = json.loads(open(os.path.join(WORKDIR, "demo_world", "heldout.jsonl")).readline())
hits = engine.search(question.get("question") or question["query"], top_k=3)
for hit in hits:
    print(f"{hit.score:+.3f}  memory {hit.id}: {hit.text[:80]}")""",
    ),
    (
        "code",
        """first = memory_ids[0]
print(engine.generate("What pet does", memories=first, max_new_tokens=8))
print("".join(engine.stream("Where does", memories=first, max_new_tokens=8)))""",
    ),
    (
        "code",
        """answer = engine.rag(question.get("question") or question["query"], top_k=3, max_new_tokens=8)
print(answer)""",
    ),
    (
        "markdown",
        """## Export to Hugging Face
The export is a plain `Qwen3ForCausalLM` directory with the meta latent tokens in its
vocabulary and tokenizer; `grc_config.json` keeps the GRC settings.""",
    ),
    (
        "code",
        """from grc_jax import hf
export_dir = os.path.join(WORKDIR, "hf_export")
hf.save_pretrained(engine.config, engine.params, export_dir, tokenizer=engine.tokenizer)
print(sorted(os.listdir(export_dir)))
try:
    import transformers
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export_dir, local_files_only=True)
    print(type(reloaded).__name__, "loaded with", sum(p.numel() for p in reloaded.parameters()), "parameters")
except ImportError:
    print("transformers is not installed: pip install 'grc_jax[hf]' to check the export")""",
    ),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata.update(
        {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "accelerator": "TPU",
            "colab": {"provenance": []},
        }
    )
    for kind, source in CELLS:
        new_cell = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(new_cell(source))
    return nb


if __name__ == "__main__":
    path = Path(__file__).with_name("colab_tpu_demo.ipynb")
    nbformat.write(build(), path)
    print("wrote", path)
