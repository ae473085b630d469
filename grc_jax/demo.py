"""One GRC forward pass, shown: `python -m grc_jax.demo [--hf DIR]`.

Packs several documents into one row, each followed by its meta latent tokens, and prints
what the single pass gives: next-token logits, one embedding per document, and one latent
memory per document, with the memory's size against the documents' full K/V. Without --hf it
uses a tiny random model and a tokenizer trained on the demo texts, so similarities are
meaningless; the shapes, sizes and invariances are the point.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from grc_jax import hf, layout, model
from grc_jax.config import ModelConfig
from grc_jax.errors import report_user_errors
from grc_jax.tokenizer import Tokenizer

DOCUMENTS = [
    "Zorvak Telmin is a potter who lives in Quarn and keeps an owl.",
    "Belna Shu is a glassblower from Ostreth; her mentor is Zorvak Telmin.",
    "The river Quarn floods every spring, and the potters move uphill.",
]
QUESTION = "Who keeps an owl?"


def _demo_tokenizer(out_dir: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(DOCUMENTS + [QUESTION], trainer)
    tk.save(str(out_dir / "tokenizer.json"))
    return Tokenizer.from_dir(out_dir)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", help="a local HF model directory (config.json + safetensors + tokenizer.json)")
    parser.add_argument(
        "--num-latents",
        type=int,
        default=None,
        help="K (default: an export's own, 16 for a plain HF model, 4 for the random model)",
    )
    args = parser.parse_args(argv)
    if args.num_latents is not None and args.num_latents < 1:
        parser.error(f"--num-latents must be >= 1, got {args.num_latents}")

    if args.hf:
        config, params = hf.load_pretrained(args.hf, num_latents=args.num_latents)
        tokenizer = Tokenizer.from_dir(args.hf)
    else:
        tokenizer = _demo_tokenizer(Path(tempfile.mkdtemp(prefix="grc_demo_")))
        config = ModelConfig(vocab_size=len(tokenizer), num_latents=args.num_latents or 4, max_segment_len=64)
        params = model.init_params(config, jax.random.key(0))
    K = config.num_latents
    tokenizer = tokenizer.with_latents(K, config.vocab_size)
    latents = tokenizer.latent_ids(K)
    docs = [tokenizer.encode(d)[: config.max_segment_len] for d in DOCUMENTS]

    fwd = jax.jit(model.forward, static_argnums=0)

    def one_pass(segments, reader):
        row = layout.example_row(segments, reader, latents, config.max_segment_len)
        meta = layout.TokenMeta(*(jnp.asarray(a[None]) for a in (row.example, row.segment, row.kind)))
        index = jnp.asarray(row.latent_index[None])
        out = fwd(config, params, jnp.asarray(row.tokens[None]), meta, kv_index=index.reshape(1, -1))
        return row, out, np.asarray(model.pool_latents(config, params, out.hidden, index)[0])

    row, out, embeddings = one_pass(docs, tokenizer.encode(QUESTION))
    _, _, alone = one_pass(docs[:1], [])  # the first document on its own: its embedding must not move

    itemsize = jnp.dtype(config.param_dtype).itemsize
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize
    doc_tokens = sum(len(d) for d in docs)
    print(
        f"model: {config.architecture}, {config.num_layers} layers, hidden {config.hidden_size}, "
        f"K={K} meta latent tokens, P={config.max_segment_len}"
    )
    print(f"one pass over {row.tokens.size} tokens ({len(docs)} documents + their latents + a question):")
    print(f"  logits      {tuple(out.logits.shape)}  (generation)")
    print(f"  embeddings  {embeddings.shape}  (one unit vector per document; retrieval)")
    print(f"  memories    {tuple(out.keys.shape)} keys + values  (per-layer K/V of each document's latents)")
    print(
        f"  memory size {len(docs) * K * kv_per_token} bytes for {len(docs)} documents vs "
        f"{doc_tokens * kv_per_token} bytes of full-text K/V ({doc_tokens / (len(docs) * K):.1f}x smaller)"
    )
    print("  cosine similarity of the document embeddings:")
    for i, e in enumerate(embeddings):
        print("   ", " ".join(f"{float(e @ f):+.3f}" for f in embeddings), f" doc {i}")
    drift = float(np.abs(alone[0] - embeddings[0]).max())
    print(f"  document 0 embedded alone vs inside the packed row: max difference {drift:.2e}")
    return {"drift": drift}


if __name__ == "__main__":
    report_user_errors(main)()
