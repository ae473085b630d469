"""`Engine`: one GRC model serving generation, embeddings, compression and RAG.

Token conventions are the training builder's (grc_jax/data/builder.py): every field is encoded on
its own with no special tokens added; a document or query segment is `[text]` (a query with
self-reasoning `[query][reasoning][eor]`), followed by the K meta latent tokens; a reader is
`[question]` and the model writes `[answer][eos]`. An instruction or sentence-transformers
prompt is encoded on its own and put before the text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grc_jax import chat as chat_lib
from grc_jax import compile_cache, hf, layout, model, priors, quantize, rundir
from grc_jax import special_tokens as special_tokens_lib
from grc_jax.config import ModelConfig
from grc_jax.cpu_kernels import int8_matvec
from grc_jax.inference.decoder import Decoder, bucket
from grc_jax.inference.memory_bank import BankSpec, MemoryBank
from grc_jax.inference.pages import page_bytes
from grc_jax.inference.sampling import GREEDY, Sampling
from grc_jax.special_tokens import FROM_MODEL, SpecialTokens
from grc_jax.tokenizer import Tokenizer, literal_special_tokens

DEFAULT_POOL_BYTES = 256 * 2**20
STOP_CHECK_STEPS = 16  # with stop strings, decode steps between checks of the text for them
MAX_SEED = 2**63 - 1


def _serialized(method):
    """Runs a public call holding the engine's lock, after any open stream has ended (the
    decoder's page pool serves one batch at a time). Calls nest: rag calls search and generate."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            self._wait_for_streams()
            return method(self, *args, **kwargs)

    return call


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
def segment_pass(
    config: ModelConfig,
    params: model.Params,
    tokens: jax.Array,
    example: jax.Array,
    kind: jax.Array,
    latent_index: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One pass over [text][latents] rows: (keys, values [B, layers, K, kv, d], embeddings [B, dim])."""
    meta = layout.TokenMeta(example, example, kind)
    out = model.forward(config, params, tokens, meta, kv_index=latent_index, compute_logits=False)
    embeddings = model.pool_latents(config, params, out.hidden, latent_index[:, None])[:, 0]
    return jnp.moveaxis(out.keys, 0, 1), jnp.moveaxis(out.values, 0, 1), embeddings


class Engine:
    """Generation, embedding (optionally self-reasoned), compression into a memory bank, search
    and RAG over one model. sentence-transformers style `encode` is included."""

    similarity_fn_name = "cosine"
    # Thread safety: every public call holds one lock, so threads sharing an engine take turns
    # (a server gets one request's batch at a time, not several in one batch). A stream holds
    # the engine from its first chunk until it ends or is closed; other threads wait meanwhile,
    # and its chunks may be read from any thread.

    def __init__(
        self,
        config: ModelConfig,
        params: model.Params,
        tokenizer: Tokenizer,
        *,
        eos_token: str | Sequence[str] | None = FROM_MODEL,
        eor_token: str | None = FROM_MODEL,
        bank: MemoryBank | None = None,
        num_pages: int | None = None,
        page_size: int = 16,
        prefill_chunk: int = 256,
        max_reason_tokens: int = 64,
        batch_size: int = 32,
        prompts: dict[str, str] | None = None,
        impl: str | None = None,
        special_tokens: SpecialTokens | None = None,
        chat_template: str | None = FROM_MODEL,
        split_special_tokens: bool = True,
        weights: str = "float",
        compilation_cache: str | bool | None = None,
    ):
        """Special tokens and the chat template come from `special_tokens` (from_pretrained reads
        them from the model's files), else from the tokenizer's tokenizer_config.json; an explicit
        eos_token (one or a list), eor_token or chat_template overrides them, None meaning none
        (no eos: generation runs to max_new_tokens; no eor: no self-reasoning).

        weights="int8": generation reads int8 dense weights with per-channel scales
        (grc_jax/quantize.py); compression and embedding passes stay float, so memories and banks
        are the float model's. compilation_cache: grc_jax/compile_cache.py (None = default)."""
        if weights not in ("float", "int8"):
            raise ValueError(f"weights must be 'float' or 'int8', got {weights!r}")
        # bfloat16 matmul operands speed training; the decode loop would round the float weights on
        # every step, so inference multiplies in float32 (grc_jax/config.py, matmul_dtype).
        config = dataclasses.replace(config, matmul_dtype="float32")
        self.compilation_cache_dir = compile_cache.enable(compilation_cache)
        # A fresh process reads its decode loop back from the cache while the rest is set up.
        compile_cache.prefetch("decode_run", repr(config))
        self.config, self.params = config, params
        self.tokenizer = _with_latents(tokenizer, config)
        # User text may contain "</s>" or "<|mlt_0|>": it is encoded as text, never as those tokens
        # (split_special_tokens=False: the caller's text may name special tokens, a chat template's say).
        self._text_tokenizer = literal_special_tokens(self.tokenizer) if split_special_tokens else self.tokenizer
        self._lock = threading.RLock()
        self._streams_done = threading.Condition(self._lock)
        self._stream_thread: int | None = None  # the thread reading an open stream's latest chunk
        self._stream_open = False
        self.latent_ids = tuple(self.tokenizer.latent_ids(config.num_latents))
        found = special_tokens if special_tokens is not None else special_tokens_lib.from_tokenizer(self.tokenizer)
        self.special_tokens = found.override(eos=eos_token, eor=eor_token, chat_template=chat_template)
        self.eos_ids = tuple(self._special(t, "eos_token") for t in self.special_tokens.eos)
        self.eos_id = self.eos_ids[0] if self.eos_ids else None  # the one training appends
        eor = self.special_tokens.eor
        self.eor_id = self._special(eor, "eor_token") if eor is not None else None
        self.chat_template: str | None = self.special_tokens.chat_template
        self.bank_spec = BankSpec.of(config, params)  # the weights are hashed once, not per bank
        self.bank = bank if bank is not None else MemoryBank(self.bank_spec)
        self.bank.spec.check_same(self.bank_spec, "memory bank")
        if num_pages is None:
            num_pages = int(np.clip(DEFAULT_POOL_BYTES // page_bytes(config, page_size), 64, 16384))
        self.weights = weights
        decode_params = quantize.quantize_params(params, config.tie_word_embeddings) if weights == "int8" else params
        self.decoder = Decoder(
            config, decode_params, num_pages=num_pages, page_size=page_size, prefill_chunk=prefill_chunk, impl=impl
        )
        self.max_reason_tokens = max_reason_tokens
        self.batch_size = batch_size
        self.prompts = dict(prompts) if prompts is not None else {"query": "", "document": ""}

    # --- opening a model ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, *, step: int | None = None, **kwargs: Any) -> "Engine":
        """Opens an HF directory (an HF checkpoint, or one written by `grc_jax.hf.save_pretrained`:
        config.json, safetensors, tokenizer.json), a llama.cpp `.gguf` file (grc_jax/gguf.py) or a
        training run directory (grc_jax/rundir.py;
        the latest step unless `step` is given). Special tokens and the chat template come from
        the directory's own files (grc_jax/special_tokens.py). kwargs go to `Engine`."""
        path = Path(path)
        compile_cache.enable(kwargs.get("compilation_cache"))
        if kwargs.get("weights") == "int8":  # its decode loop calls the native kernel: registered first
            int8_matvec.available()
        _prefetch_decode_loop(path)  # read back from the cache while the weights load
        if path.suffix == ".gguf":  # a llama.cpp file: weights and tokenizer from its one read
            from grc_jax import gguf

            config, params, tokenizer = gguf.load(path)
            found = special_tokens_lib.from_tokenizer(tokenizer)  # its metadata, as tokenizer_config
        elif (path / hf.CONFIG_FILE).is_file():
            config, params = hf.load_pretrained(path)
            tokenizer = Tokenizer.from_dir(path)
            found = special_tokens_lib.from_files(path, tokenizer)
        elif rundir.is_run_dir(path):
            run = rundir.open_run(path, step)
            config, params, tokenizer, found = run.config, run.params, run.tokenizer, run.special_tokens
        else:
            raise FileNotFoundError(
                f"{path}: neither an HF model directory ({hf.CONFIG_FILE}) nor a training "
                f"run directory ({rundir.MODEL_CONFIG_FILE})"
            )
        kwargs.setdefault("special_tokens", found)
        return cls(config, params, tokenizer, **kwargs)

    # --- compression and embeddings ----------------------------------------------------------

    @_serialized
    def compress(self, texts: str | Sequence[str]) -> list[list[int]]:
        """Stores each text's memories (one per segment of at most max_segment_len tokens) with
        their embeddings, all from one pass; returns the new memory ids per text."""
        texts = _texts(texts, "compress")
        segments, owner = [], []
        for i, text in enumerate(texts):
            ids = self._encode(text)
            if not ids:
                raise ValueError(f"text {i} is empty: nothing to compress")
            if not text.strip():  # training refuses blank fields too
                raise ValueError(f"text {i} is blank (whitespace only): nothing to compress")
            for seg in layout.split_segments(ids, self.config.max_segment_len):
                segments.append(seg)
                owner.append(i)
        keys, values, embeddings = self._segment_pass(segments)
        new = self.bank.add(keys, values, embeddings, [self.tokenizer.decode(s) for s in segments])
        out: list[list[int]] = [[] for _ in texts]
        for memory_id, i in zip(new, owner):
            out[i].append(memory_id)
        return out

    @_serialized
    def embed(
        self,
        texts: str | Sequence[str],
        reason: bool = False,
        instruction: str | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """float32 [n, dim] L2-normalised embeddings ([dim] for one string). With reason=True
        the model first writes a reasoning trace for each text (greedy, at most
        max_reason_tokens, ending at the end-of-reasoning token), all in one jitted loop."""
        single = isinstance(texts, str)
        texts = _texts(texts, "embed")
        segments = self._segments(texts, instruction)
        if reason:
            out = self.embed_with_reasoning_tokens(segments, batch_size)[0]
        else:
            out = self.embed_tokens(segments, batch_size)
        return out[0] if single else out

    @_serialized
    def embed_tokens(self, segments: Sequence[Sequence[int]], batch_size: int | None = None) -> np.ndarray:
        """Embeddings of token segments ([segment][latents], one pass each), float32 [n, dim]."""
        return self._segment_pass(segments, batch_size)[2]

    @_serialized
    def embed_with_reasoning_tokens(
        self, segments: Sequence[Sequence[int]], batch_size: int | None = None
    ) -> tuple[np.ndarray, list[list[int]]]:
        """Self-reason-latent embeddings of token segments and the reasoning each row wrote."""
        if self.eor_id is None:
            raise ValueError(
                "reason=True needs an end-of-reasoning token; this engine has none (eor_token=None, "
                "or the model's files name none): pass eor_token="
            )
        P = self.config.max_segment_len
        out, traces = [], []
        size = batch_size or self.batch_size
        for start in range(0, len(segments), size):
            chunk = [list(s)[: P - 1] for s in segments[start : start + size]]  # room for at least the eor
            budgets = [min(self.max_reason_tokens, P - 1 - len(s)) for s in chunk]
            emb, reasoning = self.decoder.reason_embed(
                chunk,
                max_reason_tokens=self.max_reason_tokens,
                eor_id=self.eor_id,
                latent_ids=self.latent_ids,
                budgets=budgets,
            )
            out.append(emb)
            traces.extend(reasoning)
        return np.concatenate(out), traces

    # sentence-transformers conventions

    @_serialized
    def encode(
        self,
        sentences: str | Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        normalize_embeddings: bool = True,
        convert_to_numpy: bool = True,
        show_progress_bar: bool = False,
        reason: bool = False,
    ) -> np.ndarray | jax.Array:
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

    @_serialized
    def remove_memories(self, ids: Sequence[int]) -> None:
        self.bank.remove(ids)

    @_serialized
    def replace_memory(self, memory_id: int, text: str) -> None:
        """New contents under an existing id; `text` must fit one segment."""
        tokens = self._encode(_texts(text, "replace_memory")[0])
        if not tokens or not text.strip():
            raise ValueError("replacement text is empty or blank")
        if len(tokens) > self.config.max_segment_len:
            raise ValueError(
                f"replacement text has {len(tokens)} tokens; one memory holds at most "
                f"max_segment_len={self.config.max_segment_len}"
            )
        self.bank.get(memory_id)  # unknown id: fail before computing anything
        keys, values, embeddings = self._segment_pass([tokens])
        self.bank.replace(memory_id, keys[0], values[0], embeddings[0], self.tokenizer.decode(tokens))

    @_serialized
    def load_bank(self, path: str | Path) -> None:
        self.bank = MemoryBank.load(path, expect=self.bank_spec)

    # --- generation --------------------------------------------------------------------------

    @_serialized
    def generate(
        self,
        prompts: str | Sequence[str],
        memories: Sequence[int] | Sequence[Sequence[int]] | None = None,
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
        stop_tokens: Sequence[str] | None = None,
        seed: int = 0,
        stop: str | Sequence[str] | None = None,
        memory_prior: Any = False,
        prior_temperature: float = 0.05,
    ) -> str | list[str]:
        """Continues each prompt, reading the named memories (one id list for all prompts, or
        one list per prompt). Stops at eos (or `stop_tokens`, special tokens by name) and at any
        of the `stop` strings (OpenAI's `stop`); neither the stop token nor the stop string, nor
        anything after it, is returned. A stop string that is one added token of the vocabulary
        ends its row inside the decode loop; other stop strings are looked for in the decoded
        text every STOP_CHECK_STEPS steps, and the batch ends once every row has met one.

        memory_prior (docs/design.md section 8): False, no prior; True, each prompt's own
        embedding (the prompt as one segment, as training lays out a question) against its
        memories' embeddings; "reason", the prompt's self-reasoned embedding (as
        `embed(..., reason=True)`; for questions that need a second hop); or caller scores, one
        list of per-memory scores per prompt (another retriever's). The prior
        log_softmax(scores / prior_temperature) over a prompt's memories is added to its attention
        logits on each memory's keys. Use the temperature the model was trained with
        (`train.prior_temperature`)."""
        single = isinstance(prompts, str)
        answers = self._generate(
            [self._encode(t) for t in _texts(prompts, "generate")],
            memories,
            max_new_tokens,
            sampling,
            stop_tokens,
            seed,
            stop,
            memory_prior,
            prior_temperature,
        )
        return answers[0] if single else answers

    def _generate(
        self,
        token_ids: list[list[int]],
        memories: Any = None,
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
        stop_tokens: Sequence[str] | None = None,
        seed: int = 0,
        stop: str | Sequence[str] | None = None,
        memory_prior: Any = False,
        prior_temperature: float = 0.05,
    ) -> list[str]:
        _check_int("max_new_tokens", max_new_tokens, 1)
        _check_int("seed", seed, 0, MAX_SEED)
        for i, t in enumerate(token_ids):
            if not t:
                raise ValueError(f"prompt {i} is empty")
        rows = self._memory_rows(memories, len(token_ids))
        bias = self.memory_priors(token_ids, rows, memory_prior, prior_temperature)
        stops, stop_strings = self._stops(stop_tokens, stop)
        settings = self.decoder.settings(max_new_tokens, sampling, stops)
        out = []
        for start in range(0, len(token_ids), self.batch_size):
            end = start + self.batch_size
            chunk, keys = token_ids[start:end], self._pool_keys(rows[start:end])
            chunk_bias = None if bias is None else bias[start:end]
            if stop_strings:
                out.extend(self._generate_until_stop(chunk, settings, keys, seed, stops, stop_strings, chunk_bias))
            else:
                out.extend(
                    self.decoder.generate(
                        chunk,
                        settings,
                        memories=keys,
                        memory_source=self._memory_source,
                        seed=seed,
                        memory_bias=chunk_bias,
                    )
                )
        return [
            chat_lib.cut_at_stop(self.tokenizer.decode(o[:-1] if o and o[-1] in stops else o), stop_strings)[0]
            for o in out
        ]

    def stream(
        self,
        prompt: str,
        memories: Sequence[int] | None = None,
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
        steps_per_chunk: int = 8,
        seed: int = 0,
        stop: str | Sequence[str] | None = None,
        stop_tokens: Sequence[str] | None = None,
    ) -> Iterator[str]:
        """Yields the answer's text as it grows, one piece per `steps_per_chunk` tokens. Text that
        may be the start of a stop string is held back until the next tokens tell; decoding ends
        at the first stop string. The arguments are checked here; the engine is held from the
        first chunk to the last."""
        if not isinstance(prompt, str):
            raise TypeError(f"stream takes one prompt string, got {type(prompt).__name__}")
        return self._stream_tokens(
            self._encode(_texts(prompt, "stream")[0]),
            memories,
            max_new_tokens,
            sampling,
            steps_per_chunk,
            seed,
            stop,
            stop_tokens,
        )

    def _stream_tokens(
        self,
        tokens: list[int],
        memories: Sequence[int] | None = None,
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
        steps_per_chunk: int = 8,
        seed: int = 0,
        stop: str | Sequence[str] | None = None,
        stop_tokens: Sequence[str] | None = None,
    ) -> Iterator[str]:
        if not tokens:
            raise ValueError("prompt 0 is empty")
        _check_int("max_new_tokens", max_new_tokens, 1)
        _check_int("steps_per_chunk", steps_per_chunk, 1)
        _check_int("seed", seed, 0, MAX_SEED)
        rows = self._memory_rows(memories, 1)
        stops, stop_strings = self._stops(stop_tokens, stop)
        return self._stream(tokens, rows, max_new_tokens, sampling, steps_per_chunk, seed, stops, stop_strings)

    def _stream(
        self,
        tokens: list[int],
        rows: list[list[int]],
        max_new_tokens: int,
        sampling: Sampling,
        steps_per_chunk: int,
        seed: int,
        stops: tuple[int, ...],
        stop_strings: tuple[str, ...],
    ) -> Iterator[str]:
        with self._lock:
            self._wait_for_streams()
            chunks = self.decoder.stream(
                [tokens],
                self.decoder.settings(max_new_tokens, sampling, stops),
                steps_per_chunk=steps_per_chunk,
                seed=seed,
                memories=self._pool_keys(rows),
                memory_source=self._memory_source,
            )
            self._stream_open = True
        try:
            yield from self._stream_text(self._locked_chunks(chunks), stops, stop_strings)
        finally:
            with self._lock:
                getattr(chunks, "close", lambda: None)()  # the decoder's finish: the batch's pages go back
                self._stream_open, self._stream_thread = False, None
                self._streams_done.notify_all()

    def _locked_chunks(self, chunks: Iterator[list[list[int]]]) -> Iterator[list[list[int]]]:
        while True:
            with self._lock:
                self._stream_thread = threading.get_ident()
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
            yield chunk

    def _stream_text(
        self, chunks: Iterator[list[list[int]]], stops: tuple[int, ...], stop_strings: tuple[str, ...]
    ) -> Iterator[str]:
        made: list[int] = []
        shown = ""
        for chunk in chunks:
            made.extend(t for t in chunk[0] if t not in stops)
            text, stopped = chat_lib.cut_at_stop(self.tokenizer.decode(made), stop_strings)
            if stopped:  # leaving the loop ends decoding: _stream's finally frees the pages
                break
            text = text[: chat_lib.safe_prefix_length(text, stop_strings)]
            # A byte-level tokenizer's chunk may end mid-character (decoded as U+FFFD): hold it back.
            if text != shown and text.startswith(shown) and not text.endswith("\ufffd"):
                yield text[len(shown) :]
                shown = text
        text = chat_lib.cut_at_stop(self.tokenizer.decode(made), stop_strings)[0]
        if text != shown and text.startswith(shown):
            yield text[len(shown) :]

    # --- chat --------------------------------------------------------------------------------

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """The prompt text of a chat, as transformers' apply_chat_template(messages, tokenize=False,
        add_generation_prompt=True) renders it with this model's template and special tokens."""
        if self.chat_template is None:
            raise ValueError(
                "this model has no chat template (no chat_template.jinja, and none in "
                "tokenizer_config.json); pass chat_template= to Engine"
            )
        variables = {**special_tokens_lib.template_variables(self.tokenizer, self.special_tokens), **template_kwargs}
        return chat_lib.render_chat(
            self.chat_template, list(messages), add_generation_prompt=add_generation_prompt, **variables
        )

    def _chat_tokens(
        self, messages: Sequence[Mapping[str, Any]], template_kwargs: Mapping[str, Any] | None
    ) -> list[int]:
        # The rendered template's special tokens (<|im_start|>, ...) are tokens, as transformers
        # tokenizes a rendered chat; user text elsewhere is encoded with them split.
        return self.tokenizer.encode(self.render_chat(messages, **dict(template_kwargs or {})))

    @_serialized
    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        memories: Sequence[int] | None = None,
        *,
        template_kwargs: Mapping[str, Any] | None = None,
        **generate_kwargs: Any,
    ) -> str:
        """The assistant's reply to `messages` ([{"role": ..., "content": ...}, ...]), reading the
        named memories; `template_kwargs` are more template variables (tools, enable_thinking, ...),
        generate_kwargs go to `generate` (max_new_tokens, sampling, stop, ...)."""
        return self._generate([self._chat_tokens(messages, template_kwargs)], memories, **generate_kwargs)[0]

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        memories: Sequence[int] | None = None,
        *,
        template_kwargs: Mapping[str, Any] | None = None,
        **stream_kwargs: Any,
    ) -> Iterator[str]:
        """`chat`, yielding the reply's text as it grows (as `stream`)."""
        return self._stream_tokens(self._chat_tokens(messages, template_kwargs), memories, **stream_kwargs)

    @_serialized
    def search(self, query: str, top_k: int = 5, reason: bool = False) -> list[Hit]:
        """The bank's top_k memories for a query, best first."""
        embedding = self.encode_query(query, reason=reason)
        ids, scores = self.bank.search(embedding[None], top_k)
        return [Hit(int(i), float(s), self.bank.get(int(i)).text) for i, s in zip(ids[0], scores[0])]

    @_serialized
    def rag(
        self,
        question: str,
        top_k: int = 4,
        reason: bool = False,
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
        memory_prior: bool = False,
        prior_temperature: float = 0.05,
    ) -> RagAnswer:
        """Search with the question, then answer it reading the top_k memories (with
        memory_prior, weighted by the search's own cosine scores: see `generate`)."""
        _check_int("max_new_tokens", max_new_tokens, 1)
        hits = self.search(question, top_k, reason=reason)
        ids = [h.id for h in hits]
        prior = [[h.score for h in hits]] if memory_prior else False
        answer = self.generate(
            question,
            memories=ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            memory_prior=prior,
            prior_temperature=prior_temperature,
        )
        return RagAnswer(answer, ids, [h.score for h in hits])

    def memory_priors(
        self,
        prompts: Sequence[Sequence[int]],
        rows: Sequence[Sequence[int]],
        memory_prior: Any,
        prior_temperature: float,
    ) -> list[list[float]] | None:
        """Per prompt, the log-prior of each of its memories (see `generate`), or None."""
        if memory_prior is None or memory_prior is False:
            return None
        if prior_temperature <= 0:
            raise ValueError(f"prior_temperature must be > 0, got {prior_temperature}")
        if memory_prior is True or memory_prior == "reason":
            segments = [list(p)[: self.config.max_segment_len] for p in prompts]
            # "reason": the prompt embedded after its own reasoning trace, as multi-hop retrieval
            # embeds a query; a question that names one person but asks about another (the
            # mentor's colour) then points to the memory that answers it, not the one it names.
            questions = (
                self.embed_with_reasoning_tokens(segments)[0]
                if memory_prior == "reason"
                else self.embed_tokens(segments)
            )
            scores = [[float(np.dot(q, self.bank.get(m).embedding)) for m in row] for q, row in zip(questions, rows)]
        else:
            scores = [[float(x) for x in row] for row in memory_prior]
            if len(scores) != len(rows) or any(len(s) != len(r) for s, r in zip(scores, rows)):
                raise ValueError(
                    f"memory_prior scores must give one score per memory of each prompt: memories "
                    f"{[len(r) for r in rows]}, scores {[len(s) for s in scores]}"
                )
        return [
            np.asarray(priors.log_prior(np.asarray(s, np.float32) / prior_temperature)).tolist() if s else []
            for s in scores
        ]

    # --- internals ---------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """User text's token ids, as every call of the engine encodes it: special tokens typed in
        the text are text (unless the engine was made with split_special_tokens=False)."""
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        """User text as tokens: special-token strings in it stay text."""
        return self._text_tokenizer.encode(text)

    def _wait_for_streams(self) -> None:
        """Waits (holding the lock on return) until no stream is open; the thread reading one
        cannot wait for itself."""
        while self._stream_open:
            if self._stream_thread == threading.get_ident():
                raise RuntimeError(
                    "a stream of this engine is open in this thread: read it to the end or close it first"
                )
            self._streams_done.wait()

    def _special(self, token: str, name: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{name} {token!r} is not in the tokenizer; pass {name}= with one it has")
        if token_id >= self.config.vocab_size:
            raise ValueError(
                f"{name} {token!r} has id {token_id}, outside the model's vocabulary of {self.config.vocab_size}"
            )
        return token_id

    def _stop_ids(self, stop_tokens: Sequence[str] | None) -> tuple[int, ...]:
        if stop_tokens is None:
            return self.eos_ids
        return tuple(self._special(t, "stop token") for t in stop_tokens)

    def _stops(
        self, stop_tokens: Sequence[str] | None, stop: str | Sequence[str] | None
    ) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(stop token ids, stop strings): a stop string that is an added token (<|im_end|>, say)
        is a stop token, which the decode loop handles itself; the others are matched in text."""
        ids = list(self._stop_ids(stop_tokens))
        added = {t.content: i for i, t in self.tokenizer.inner.get_added_tokens_decoder().items()}
        strings = []
        for s in chat_lib.as_stop_list(stop):
            if s in added and added[s] < self.config.vocab_size:
                ids.append(added[s])
            else:
                strings.append(s)
        return tuple(dict.fromkeys(ids)), tuple(strings)

    def _generate_until_stop(
        self,
        prompts: list[list[int]],
        settings: Any,
        keys: list[list[Any]],
        seed: int,
        stops: tuple[int, ...],
        stop_strings: tuple[str, ...],
        memory_bias: list[list[float]] | None = None,
    ) -> list[list[int]]:
        """Decodes in chunks of STOP_CHECK_STEPS steps until every row has met a stop token, a stop
        string or its budget. The same compiled loop as `generate`, so the tokens are the same."""
        made: list[list[int]] = [[] for _ in prompts]
        ended = [False] * len(prompts)
        pieces = self.decoder.stream(
            prompts,
            settings,
            steps_per_chunk=STOP_CHECK_STEPS,
            memories=keys,
            memory_source=self._memory_source,
            seed=seed,
            memory_bias=memory_bias,
        )
        with _closing(pieces):
            for chunk in pieces:
                for b, new in enumerate(chunk):
                    if ended[b] or not new:
                        continue
                    made[b].extend(new)
                    ended[b] = (
                        made[b][-1] in stops or chat_lib.cut_at_stop(self.tokenizer.decode(made[b]), stop_strings)[1]
                    )
                if all(ended):
                    break
        return made

    def _segments(self, texts: Sequence[str], instruction: str | None) -> list[list[int]]:
        prefix = self._encode(_texts(instruction, "instruction")[0]) if instruction else []
        segments = []
        for i, text in enumerate(texts):
            ids = self._encode(text)
            if not ids:
                raise ValueError(f"text {i} is empty: nothing to embed")
            if not text.strip():
                raise ValueError(f"text {i} is blank (whitespace only): nothing to embed")
            segments.append((prefix + ids)[: self.config.max_segment_len])
        return segments

    def _segment_pass(
        self, segments: Sequence[Sequence[int]], batch_size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[segment][latents] rows, padded to bucketed shapes: keys, values, embeddings."""
        K, P = self.config.num_latents, self.config.max_segment_len
        size = batch_size or self.batch_size
        keys, values, embeddings = [], [], []
        for start in range(0, len(segments), size):
            chunk = [list(s) for s in segments[start : start + size]]
            if any(not 1 <= len(s) <= P for s in chunk):
                raise ValueError(f"segments must have 1..{P} tokens")
            width = min(bucket(max(map(len, chunk)) + K), P + K)
            # Laid out by the code that lays out training rows: the memory is the one training shaped.
            rows = layout.segment_rows(chunk, self.latent_ids, P, width, num_rows=bucket(len(chunk)))
            k, v, e = jax.device_get(
                segment_pass(
                    self.config,
                    self.params,
                    *map(jnp.asarray, (rows.tokens, rows.example, rows.kind, rows.latent_index)),
                )
            )
            keys.append(k[: len(chunk)])
            values.append(v[: len(chunk)])
            embeddings.append(e[: len(chunk)])
        return np.concatenate(keys), np.concatenate(values), np.concatenate(embeddings)

    def _memory_rows(self, memories: Any, n: int) -> list[list[int]]:
        if memories is None:
            return [[] for _ in range(n)]
        if isinstance(memories, (str, bytes)):  # list("12") would be the ids 1 and 2
            raise ValueError(f"memories must be a list of integer ids, got the string {memories!r}")
        memories = list(memories)
        is_id = [_is_memory_id(m) for m in memories]
        if all(is_id):
            return [[int(m) for m in memories] for _ in range(n)]
        if any(is_id):
            raise ValueError(
                f"memories must be one list of ids for every prompt, or one list per prompt; got {memories!r}"
            )
        for m in memories:
            if isinstance(m, (str, bytes)) or not isinstance(m, Iterable):
                raise ValueError(f"memory id {m!r} is not an integer (ids from JSON must be numbers, not strings)")
        if len(memories) != n:
            raise ValueError(f"{len(memories)} memory lists for {n} prompts")
        rows = [list(row) for row in memories]
        for row in rows:
            for m in row:
                if not _is_memory_id(m):
                    raise ValueError(f"memory id {m!r} is not an integer (ids from JSON must be numbers, not strings)")
        return [[int(m) for m in row] for row in rows]

    def _pool_keys(self, rows: list[list[int]]) -> list[list[Any]]:
        return [[self.bank.pool_key(m) for m in row] for row in rows]  # raises on an unknown id

    def _memory_source(self, keys: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        for uid, memory_id, version in keys:
            if uid != self.bank.uid or self.bank.get(memory_id).version != version:
                raise KeyError(f"memory {memory_id} changed while a request was being admitted")
        return self.bank.kv([memory_id for _, memory_id, _ in keys])


@contextlib.contextmanager
def _closing(pieces: Iterator[Any]) -> Iterator[Iterator[Any]]:
    """Closes a decode generator left early (its `finally` frees the batch's pages)."""
    try:
        yield pieces
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()


def _is_memory_id(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _texts(texts: Any, what: str) -> list[str]:
    """The texts of a call, each a string that the tokenizer can read, at least one."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError(f"{what}: no texts given")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}: text {i} must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, from a bad JSON escape say
            raise ValueError(
                f"{what}: text {i} is not valid Unicode: {e.reason} at character {e.start} ({text[e.start]!r})"
            ) from None
    return texts


def _check_int(name: str, value: Any, least: int, most: int | None = None) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < least or (most is not None and value > most):
        bounds = f">= {least}" if most is None else f"in [{least}, {most}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")


def _prefetch_decode_loop(path: Path) -> None:
    """Starts reading back the cached decode loop of the model at `path` before its weights
    load (compile_cache.prefetch): a run directory names its exact config; of an HF directory or
    GGUF file only the shapes are known before loading (the config's repr from hidden_size up to
    its GRC fields: a GRC export's config.json counts the latent rows in vocab_size), which picks
    the most recent program of any model of those shapes."""
    try:
        if rundir.is_run_dir(path):
            marker = repr(rundir.read_model_config(path))
        elif path.suffix == ".gguf" or (path / hf.CONFIG_FILE).is_file():
            shapes = repr(hf.read_checkpoint_config(path))
            marker = shapes[shapes.index(", hidden_size=") : shapes.index(", num_latents=")]
        else:
            return
    except Exception:  # a broken model is reported by the load that follows, not here
        return
    compile_cache.prefetch("decode_run", marker)


def _with_latents(tokenizer: Tokenizer, config: ModelConfig) -> Tokenizer:
    try:
        ids = tokenizer.latent_ids(config.num_latents)
    except ValueError:
        tokenizer = tokenizer.with_latents(config.num_latents, config.vocab_size)
        ids = tokenizer.latent_ids(config.num_latents)
    if tuple(ids) != config.latent_token_ids:
        raise ValueError(
            f"the tokenizer's meta latent tokens have ids {ids[:4]}..., the model expects "
            f"{list(config.latent_token_ids[:4])}..."
        )
    return tokenizer
