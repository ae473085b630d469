"""`Engine`: one GRC model serving generation, embeddings, compression and RAG.

Token conventions are the training builder's (grc_jax/data/builder.py): every field is encoded on
its own with no special tokens added; a document or query segment is `[text]` (a query with
self-reasoning `[query][reasoning][eor]`), followed by the K meta latent tokens; a reader is
`[question]` and the model writes `[answer][eos]`. An instruction or sentence-transformers
prompt is encoded on its own and put before the text.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grc_jax import compile_cache, hf, layout, model, quantize
from grc_jax.config import ModelConfig
from grc_jax.inference.decode import GREEDY, Decoder, Sampling, bucket
from grc_jax.inference.memory_bank import BankSpec, MemoryBank
from grc_jax.inference.pages import page_bytes
from grc_jax.tokenizer import Tokenizer

DEFAULT_POOL_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class Hit:
    id: int
    score: float
    text: str | None


@dataclasses.dataclass(frozen=True)
class RagAnswer:
    answer: str
    memory_ids: list[int]
    scores: list[float]


@functools.partial(jax.jit, static_argnums=0)
def segment_pass(config: ModelConfig, params: model.Params, tokens: jax.Array, example: jax.Array, kind: jax.Array,
                  latent_index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One pass over [text][latents] rows: (keys, values [B, layers, K, kv, d], embeddings [B, dim])."""
    meta = layout.TokenMeta(example, example, kind)
    out = model.forward(config, params, tokens, meta, kv_index=latent_index, compute_logits=False)
    embeddings = model.pool_latents(config, params, out.hidden, latent_index[:, None])[:, 0]
    return jnp.moveaxis(out.keys, 0, 1), jnp.moveaxis(out.values, 0, 1), embeddings


class Engine:
    """Generation, embedding (optionally self-reasoned), compression into a memory bank, search
    and RAG over one model. sentence-transformers style `encode` is included."""

    similarity_fn_name = "cosine"

    def __init__(self, config: ModelConfig, params: model.Params, tokenizer: Tokenizer, *,
                 eos_token: str = "</s>", eor_token: str | None = "<|end_of_reasoning|>",
                 bank: MemoryBank | None = None, num_pages: int | None = None, page_size: int = 16,
                 prefill_chunk: int = 256, max_reason_tokens: int = 64, batch_size: int = 32,
                 prompts: dict[str, str] | None = None, impl: str | None = None, weights: str = "float",
                 compilation_cache: str | bool | None = None):
        # weights="int8": generation reads int8 dense weights with per-channel scales
        # (grc_jax/quantize.py); compression and embedding passes stay float, so memories and
        # banks are the float model's. compilation_cache: grc_jax/compile_cache.py (None = default).
        if weights not in ("float", "int8"):
            raise ValueError(f"weights must be 'float' or 'int8', got {weights!r}")
        self.compilation_cache_dir = compile_cache.enable(compilation_cache)
        self.config, self.params = config, params
        self.tokenizer = _with_latents(tokenizer, config)
        self.latent_ids = tuple(self.tokenizer.latent_ids(config.num_latents))
        self.eos_id = self._special(eos_token, "eos_token")
        self.eor_id = self._special(eor_token, "eor_token") if eor_token is not None else None
        self.bank_spec = BankSpec.of(config, params)  # the weights are hashed once, not per bank
        self.bank = bank if bank is not None else MemoryBank(self.bank_spec)
        self.bank.spec.check_same(self.bank_spec, "memory bank")
        if num_pages is None:
            num_pages = int(np.clip(DEFAULT_POOL_BYTES // page_bytes(config, page_size), 64, 16384))
        self.weights = weights
        decode_params = quantize.quantize_params(params, config.tie_word_embeddings) if weights == "int8" else params
        self.decoder = Decoder(config, decode_params, num_pages=num_pages, page_size=page_size,
                               prefill_chunk=prefill_chunk, impl=impl)
        self.max_reason_tokens = max_reason_tokens
        self.batch_size = batch_size
        self.prompts = dict(prompts) if prompts is not None else {"query": "", "document": ""}

    # --- opening a model ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, *, step: int | None = None, **kwargs: Any) -> "Engine":
        """Opens an HF directory written by `grc_jax.hf.save_pretrained` (config.json, safetensors,
        tokenizer.json) or a training run directory (model_config.json, tokenizer/, Orbax
        checkpoints/<step>/; the latest step unless `step` is given). kwargs go to `Engine`."""
        path = Path(path)
        if (path / hf.CONFIG_FILE).is_file():
            config, params = hf.load_pretrained(path)
            tokenizer = Tokenizer.from_dir(path)
        elif (path / "model_config.json").is_file():
            config = _read_model_config(path / "model_config.json")
            tokenizer = Tokenizer.from_dir(path / "tokenizer")
            params = _restore_params(config, path / "checkpoints", step)
        else:
            raise FileNotFoundError(f"{path}: neither an HF model directory ({hf.CONFIG_FILE}) nor a training "
                                    f"run directory (model_config.json)")
        return cls(config, params, tokenizer, **kwargs)

    # --- compression and embeddings ----------------------------------------------------------

    def compress(self, texts: str | Sequence[str]) -> list[list[int]]:
        """Stores each text's memories (one per segment of at most max_segment_len tokens) with
        their embeddings, all from one pass; returns the new memory ids per text."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        segments, owner = [], []
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(text) if isinstance(text, str) else []
            if not ids:
                raise ValueError(f"text {i} is empty: nothing to compress")
            for seg in layout.split_segments(ids, self.config.max_segment_len):
                segments.append(seg)
                owner.append(i)
        keys, values, embeddings = self._segment_pass(segments)
        new = self.bank.add(keys, values, embeddings, [self.tokenizer.decode(s) for s in segments])
        out: list[list[int]] = [[] for _ in texts]
        for memory_id, i in zip(new, owner):
            out[i].append(memory_id)
        return out

    def embed(self, texts: str | Sequence[str], reason: bool = False, instruction: str | None = None,
              batch_size: int | None = None) -> np.ndarray:
        """float32 [n, dim] L2-normalised embeddings ([dim] for one string). With reason=True
        the model first writes a reasoning trace for each text (greedy, at most
        max_reason_tokens, ending at the end-of-reasoning token), all in one jitted loop."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        segments = self._segments(texts, instruction)
        if reason:
            out = self.embed_with_reasoning_tokens(segments, batch_size)[0]
        else:
            out = self.embed_tokens(segments, batch_size)
        return out[0] if single else out

    def embed_tokens(self, segments: Sequence[Sequence[int]], batch_size: int | None = None) -> np.ndarray:
        """Embeddings of token segments ([segment][latents], one pass each), float32 [n, dim]."""
        return self._segment_pass(segments, batch_size)[2]

    def embed_with_reasoning_tokens(self, segments: Sequence[Sequence[int]], batch_size: int | None = None
                                    ) -> tuple[np.ndarray, list[list[int]]]:
        """Self-reason-latent embeddings of token segments and the reasoning each row wrote."""
        if self.eor_id is None:
            raise ValueError("reason=True needs an end-of-reasoning token; the engine was made with eor_token=None")
        P = self.config.max_segment_len
        out, traces = [], []
        size = batch_size or self.batch_size
        for start in range(0, len(segments), size):
            chunk = [list(s)[: P - 1] for s in segments[start:start + size]]  # room for at least the eor
            budgets = [min(self.max_reason_tokens, P - 1 - len(s)) for s in chunk]
            emb, reasoning = self.decoder.reason_embed(chunk, max_reason_tokens=self.max_reason_tokens,
                                                       eor_id=self.eor_id, latent_ids=self.latent_ids, budgets=budgets)
            out.append(emb)
            traces.extend(reasoning)
        return np.concatenate(out), traces

    # sentence-transformers conventions

    def encode(self, sentences: str | Sequence[str], prompt_name: str | None = None, prompt: str | None = None,
               batch_size: int = 32, normalize_embeddings: bool = True, convert_to_numpy: bool = True,
               show_progress_bar: bool = False, reason: bool = False) -> np.ndarray | jax.Array:
        """As SentenceTransformer.encode. GRC embeddings are L2-normalised by definition, so
        normalize_embeddings=False returns them as they are; show_progress_bar is accepted and
        ignored."""
        del normalize_embeddings, show_progress_bar
        if prompt is None and prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name {prompt_name!r} is not one of {sorted(self.prompts)}")
            prompt = self.prompts[prompt_name]
        out = self.embed(sentences, reason=reason, instruction=prompt or None, batch_size=batch_size)
        return out if convert_to_numpy else jnp.asarray(out)

    def encode_query(self, sentences: str | Sequence[str], **kwargs: Any) -> np.ndarray | jax.Array:
        if "prompt" not in kwargs and "query" in self.prompts:
            kwargs.setdefault("prompt_name", "query")
        return self.encode(sentences, **kwargs)

    def encode_document(self, sentences: str | Sequence[str], **kwargs: Any) -> np.ndarray | jax.Array:
        if "prompt" not in kwargs and "document" in self.prompts:
            kwargs.setdefault("prompt_name", "document")
        return self.encode(sentences, **kwargs)

    def similarity(self, a: Any, b: Any) -> np.ndarray:
        """Cosine similarity matrix [len(a), len(b)]."""
        a, b = (np.atleast_2d(np.asarray(x, np.float32)) for x in (a, b))
        a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
        return a @ b.T

    # --- memories ----------------------------------------------------------------------------

    def remove_memories(self, ids: Sequence[int]) -> None:
        self.bank.remove(ids)

    def replace_memory(self, memory_id: int, text: str) -> None:
        """New contents under an existing id; `text` must fit one segment."""
        tokens = self.tokenizer.encode(text)
        if not tokens:
            raise ValueError("replacement text is empty")
        if len(tokens) > self.config.max_segment_len:
            raise ValueError(f"replacement text has {len(tokens)} tokens; one memory holds at most "
                             f"max_segment_len={self.config.max_segment_len}")
        self.bank.get(memory_id)  # unknown id: fail before computing anything
        keys, values, embeddings = self._segment_pass([tokens])
        self.bank.replace(memory_id, keys[0], values[0], embeddings[0], self.tokenizer.decode(tokens))

    def load_bank(self, path: str | Path) -> None:
        self.bank = MemoryBank.load(path, expect=self.bank_spec)

    # --- generation --------------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str], memories: Sequence[int] | Sequence[Sequence[int]] | None = None,
                 max_new_tokens: int = 64, sampling: Sampling = GREEDY, stop_tokens: Sequence[str] | None = None,
                 seed: int = 0) -> str | list[str]:
        """Continues each prompt, reading the named memories (one id list for all prompts, or
        one list per prompt). Stops at eos (or `stop_tokens`); the stop token is not returned."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        token_ids = [self.tokenizer.encode(t) for t in texts]
        for i, t in enumerate(token_ids):
            if not t:
                raise ValueError(f"prompt {i} is empty")
        rows = self._memory_rows(memories, len(texts))
        stops = self._stop_ids(stop_tokens)
        settings = self.decoder.settings(max_new_tokens, sampling, stops)
        out = []
        for start in range(0, len(texts), self.batch_size):
            out.extend(self.decoder.generate(token_ids[start:start + self.batch_size], settings,
                                             memories=self._pool_keys(rows[start:start + self.batch_size]),
                                             memory_source=self._memory_source, seed=seed))
        answers = [self.tokenizer.decode(o[:-1] if o and o[-1] in stops else o) for o in out]
        return answers[0] if single else answers

    def stream(self, prompt: str, memories: Sequence[int] | None = None, max_new_tokens: int = 64,
               sampling: Sampling = GREEDY, steps_per_chunk: int = 8, seed: int = 0) -> Iterator[str]:
        """Yields the answer's text as it grows, one piece per `steps_per_chunk` tokens."""
        tokens = self.tokenizer.encode(prompt)
        if not tokens:
            raise ValueError("prompt 0 is empty")
        stops = self._stop_ids(None)
        made: list[int] = []
        shown = ""
        for chunk in self.decoder.stream([tokens], self.decoder.settings(max_new_tokens, sampling, stops),
                                         steps_per_chunk=steps_per_chunk, seed=seed,
                                         memories=self._pool_keys(self._memory_rows(memories, 1)),
                                         memory_source=self._memory_source):
            made.extend(t for t in chunk[0] if t not in stops)
            text = self.tokenizer.decode(made)
            # A byte-level tokenizer's chunk may end mid-character (decoded as U+FFFD): hold it back.
            if text != shown and text.startswith(shown) and not text.endswith("\ufffd"):
                yield text[len(shown):]
                shown = text
        text = self.tokenizer.decode(made)
        if text != shown and text.startswith(shown):
            yield text[len(shown):]

    def search(self, query: str, top_k: int = 5, reason: bool = False) -> list[Hit]:
        """The bank's top_k memories for a query, best first."""
        embedding = self.encode_query(query, reason=reason)
        ids, scores = self.bank.search(embedding[None], top_k)
        return [Hit(int(i), float(s), self.bank.get(int(i)).text) for i, s in zip(ids[0], scores[0])]

    def rag(self, question: str, top_k: int = 4, reason: bool = False, max_new_tokens: int = 64,
            sampling: Sampling = GREEDY) -> RagAnswer:
        """Search with the question, then answer it reading the top_k memories."""
        hits = self.search(question, top_k, reason=reason)
        ids = [h.id for h in hits]
        answer = self.generate(question, memories=ids, max_new_tokens=max_new_tokens, sampling=sampling)
        return RagAnswer(answer, ids, [h.score for h in hits])

    # --- internals ---------------------------------------------------------------------------

    def _special(self, token: str, name: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{name} {token!r} is not in the tokenizer; pass {name}= with one it has")
        if token_id >= self.config.vocab_size:
            raise ValueError(f"{name} {token!r} has id {token_id}, outside the model's vocabulary of "
                             f"{self.config.vocab_size}")
        return token_id

    def _stop_ids(self, stop_tokens: Sequence[str] | None) -> tuple[int, ...]:
        if stop_tokens is None:
            return (self.eos_id,)
        return tuple(self._special(t, "stop token") for t in stop_tokens)

    def _segments(self, texts: Sequence[str], instruction: str | None) -> list[list[int]]:
        prefix = self.tokenizer.encode(instruction) if instruction else []
        segments = []
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(text) if isinstance(text, str) else []
            if not ids:
                raise ValueError(f"text {i} is empty: nothing to embed")
            segments.append((prefix + ids)[: self.config.max_segment_len])
        return segments

    def _segment_pass(self, segments: Sequence[Sequence[int]], batch_size: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[segment][latents] rows, padded to bucketed shapes: keys, values, embeddings."""
        K, P = self.config.num_latents, self.config.max_segment_len
        size = batch_size or self.batch_size
        keys, values, embeddings = [], [], []
        for start in range(0, len(segments), size):
            chunk = [list(s) for s in segments[start:start + size]]
            if any(not 1 <= len(s) <= P for s in chunk):
                raise ValueError(f"segments must have 1..{P} tokens")
            B, width = bucket(len(chunk)), min(bucket(max(map(len, chunk)) + K), P + K)
            tokens, example, kind = (np.zeros((B, width), np.int32) for _ in range(3))
            kind[:] = layout.READER
            index = np.zeros((B, K), np.int32)
            for i, seg in enumerate(chunk):
                n = len(seg)
                tokens[i, : n + K] = seg + list(self.latent_ids)
                example[i, : n + K] = 1
                kind[i, :n], kind[i, n:n + K] = layout.TEXT, layout.LATENT
                index[i] = np.arange(n, n + K)
            k, v, e = jax.device_get(segment_pass(self.config, self.params, *map(jnp.asarray, (tokens, example, kind,
                                                                                                 index))))
            keys.append(k[: len(chunk)])
            values.append(v[: len(chunk)])
            embeddings.append(e[: len(chunk)])
        return np.concatenate(keys), np.concatenate(values), np.concatenate(embeddings)

    def _memory_rows(self, memories: Any, n: int) -> list[list[int]]:
        if memories is None:
            return [[] for _ in range(n)]
        memories = list(memories)
        is_id = [isinstance(m, (int, np.integer)) for m in memories]
        if all(is_id):
            return [[int(m) for m in memories] for _ in range(n)]
        if any(is_id):
            raise ValueError(f"memories must be one list of ids for every prompt, or one list per prompt; got "
                             f"{memories!r}")
        if len(memories) != n:
            raise ValueError(f"{len(memories)} memory lists for {n} prompts")
        return [[int(m) for m in row] for row in memories]

    def _pool_keys(self, rows: list[list[int]]) -> list[list[Any]]:
        return [[self.bank.pool_key(m) for m in row] for row in rows]  # raises on an unknown id

    def _memory_source(self, keys: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        for uid, memory_id, version in keys:
            if uid != self.bank.uid or self.bank.get(memory_id).version != version:
                raise KeyError(f"memory {memory_id} changed while a request was being admitted")
        return self.bank.kv([memory_id for _, memory_id, _ in keys])


def _with_latents(tokenizer: Tokenizer, config: ModelConfig) -> Tokenizer:
    try:
        ids = tokenizer.latent_ids(config.num_latents)
    except ValueError:
        tokenizer = tokenizer.with_latents(config.num_latents, config.vocab_size)
        ids = tokenizer.latent_ids(config.num_latents)
    if tuple(ids) != config.latent_token_ids:
        raise ValueError(f"the tokenizer's meta latent tokens have ids {ids[:4]}..., the model expects "
                         f"{list(config.latent_token_ids[:4])}...")
    return tokenizer


def _read_model_config(path: Path) -> ModelConfig:
    fields = json.loads(path.read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path}: unknown ModelConfig fields {unknown}")
    if fields.get("rope_scaling"):
        fields["rope_scaling"] = tuple(tuple(pair) for pair in fields["rope_scaling"])
    return ModelConfig(**fields)


def _restore_params(config: ModelConfig, checkpoints: Path, step: int | None) -> model.Params:
    """The `params` of the `state` item of an Orbax CheckpointManager directory (grc_jax.train),
    restored alone (no optimizer state), onto the default device."""
    import orbax.checkpoint as ocp

    if not checkpoints.is_dir():
        raise FileNotFoundError(f"{checkpoints}: no checkpoints directory")
    manager = ocp.CheckpointManager(checkpoints.absolute())
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"{checkpoints}: no finished checkpoint")
        if step is None:
            step = manager.latest_step()
        elif step not in steps:
            raise ValueError(f"{checkpoints}: no step {step}; steps: {sorted(steps)}")
        abstract = {"params": model.param_shapes(config)}
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), abstract)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)))
    finally:
        manager.close()
    return restored["state"]["params"]
