"""A thin wrapper of an HF `tokenizers` tokenizer (tokenizer.json) with the meta latent tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import tokenizers

from grc_jax.config import read_json

LATENT_TOKEN = "<|mlt_{}|>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
    """A model directory's own tokenizer, plus `<|mlt_0|> .. <|mlt_{K-1}|>` at fixed ids."""

    def __init__(self, inner: tokenizers.Tokenizer, hf_config: dict[str, Any] | None = None):
        self.inner = inner
        self.hf_config = dict(hf_config or {})

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json; grc_jax reads HF fast tokenizers only")
        try:
            inner = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ValueError(f"{file}: not a valid tokenizer.json: {e}") from None
        config_file = file.parent / TOKENIZER_CONFIG_FILE
        return cls(inner, read_json(config_file) if config_file.is_file() else None)

    def with_latents(self, num_latents: int, first_id: int) -> "Tokenizer":
        """Adds the meta latent tokens as special tokens with ids first_id .. first_id+K-1.

        The ids follow the model's vocabulary rows, which may be more than the tokenizer's own
        size, so the tokens go into the model's vocab with explicit ids (BPE, WordPiece and
        WordLevel keep ids in a dict; Unigram cannot).
        """
        spec = json.loads(self.inner.to_str())
        vocab = spec["model"].get("vocab")
        if not isinstance(vocab, dict):
            raise ValueError(f"cannot add meta latent tokens at fixed ids to a {spec['model'].get('type')} tokenizer")
        # Added tokens outside the model's vocab (Qwen's <|im_end|>, say) keep their ids only if the
        # vocab names them: rebuilt with new rows in the vocab, `tokenizers` would renumber them.
        for added in spec["added_tokens"]:
            vocab.setdefault(added["content"], added["id"])
        for j in range(num_latents):
            content, token_id = LATENT_TOKEN.format(j), first_id + j
            existing = self.inner.token_to_id(content)
            if existing is not None:
                if existing != token_id:
                    raise ValueError(f"tokenizer has {content} at id {existing}, the model expects {token_id}")
                continue
            taken = self.inner.id_to_token(token_id)
            if taken is not None:
                raise ValueError(f"tokenizer id {token_id} is taken by {taken!r}; it is needed for {content}")
            vocab[content] = token_id
            spec["added_tokens"].append(
                {
                    "id": token_id,
                    "content": content,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }
            )
        return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), self.hf_config)

    def latent_ids(self, num_latents: int) -> list[int]:
        ids = [self.inner.token_to_id(LATENT_TOKEN.format(j)) for j in range(num_latents)]
        if None in ids:
            raise ValueError(f"tokenizer lacks meta latent tokens; call with_latents({num_latents}, first_id) first")
        return ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.inner.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.inner.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.inner.id_to_token(token_id)

    def special_id(self, name: str) -> int | None:
        """The id of `eos_token`, `bos_token` or `pad_token` as tokenizer_config.json names it."""
        token = self.hf_config.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        return self.inner.token_to_id(token) if token else None

    def __len__(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def save(self, out_dir: str | Path) -> None:
        """Writes tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer reads."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.inner.save(str(out_dir / TOKENIZER_FILE))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.hf_config}
        config.pop("added_tokens_decoder", None)  # tokenizer.json is the source of truth for added tokens
        (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")


def literal_special_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """A copy whose `encode` reads special-token strings in text as plain text, as transformers'
    `split_special_tokens=True` does: a user's "</s>" or "<|mlt_0|>" becomes ordinary pieces,
    never the eos or a meta latent token. For text from users (prompts, documents, queries,
    training records); the model's own tokens are added by id."""
    inner = tokenizers.Tokenizer.from_str(tokenizer.inner.to_str())
    inner.encode_special_tokens = True
    return Tokenizer(inner, tokenizer.hf_config)
