"""A model's special tokens (bos, eos, pad, end-of-reasoning) and chat template, from its own files.

Where each comes from, first match wins:

- bos / eos / pad: `generation_config.json`'s `*_token_id`, then `config.json`'s, then
  `tokenizer_config.json`'s `*_token` (as transformers' generate reads ids from the generation
  config and falls back to the model config). eos may be one id or a list (Llama 3); the
  tokenizer's own eos, when it is one of them, goes first: it is the one training appends.
- eor (GRC's end of reasoning, no HF equivalent): `grc_config.json`'s or tokenizer_config.json's
  `eor_token`, else the first of `<|end_of_reasoning|>`, `</think>` the tokenizer has.
- chat template: `chat_template.jinja` (transformers 5 writes it there), then
  tokenizer_config.json's `chat_template` (a string, or a list of named templates: "default").
- A bare tokenizer.json (no config.json, generation_config.json or token names in
  tokenizer_config.json; the demo world's) gets grc_jax's own `<s>`, `</s>`, `<pad>` where it
  has them, as every run before the tokens were recorded used.

A token found nowhere is None (no eos: generation runs to max_new_tokens). Explicit values
(`Engine(eos_token=...)`, `--config.data.eos_token=`, `--eos-token=`) override all of this.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from grc_jax.config import read_json
from grc_jax.tokenizer import Tokenizer

GENERATION_CONFIG_FILE = "generation_config.json"
CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GRC_CONFIG_FILE = "grc_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
EOR_CANDIDATES = ("<|end_of_reasoning|>", "</think>")
_LEGACY = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}  # train_config's defaults before tokens were resolved
NAMES = ("bos", "eos", "pad", "eor")


class _FromModel:
    """Marks an argument left to the model's files (None already means 'no such token')."""

    def __repr__(self) -> str:
        return "FROM_MODEL"


FROM_MODEL: Any = _FromModel()


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Token strings (not ids: they survive a vocabulary that grows). `eos` is every token that
    ends a generation, the one training appends first."""

    bos: str | None = None
    eos: tuple[str, ...] = ()
    pad: str | None = None
    eor: str | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        eos = (self.eos,) if isinstance(self.eos, str) else tuple(self.eos or ())
        object.__setattr__(self, "eos", tuple(dict.fromkeys(eos)))  # no duplicates, order kept

    @property
    def eos_token(self) -> str | None:
        return self.eos[0] if self.eos else None

    def override(self, **values: Any) -> "SpecialTokens":
        """A copy with the values that are not FROM_MODEL (None clears a token)."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not FROM_MODEL})

    def ids(self, tokenizer: Tokenizer) -> dict[str, Any]:
        """{'bos': id | None, 'eos': [ids], 'pad': id | None, 'eor': id | None}; a token the
        tokenizer lacks is an error naming it."""

        def one(name: str, token: str | None) -> int | None:
            if token is None:
                return None
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{name}_token {token!r} is not in the tokenizer")
            return token_id

        return {
            "bos": one("bos", self.bos),
            "eos": [one("eos", t) for t in self.eos],
            "pad": one("pad", self.pad),
            "eor": one("eor", self.eor),
        }

    def template_variables(self) -> dict[str, str]:
        """The special tokens a chat template sees, under transformers' names (set ones only)."""
        named = {"bos_token": self.bos, "eos_token": self.eos_token, "pad_token": self.pad}
        return {k: v for k, v in named.items() if v is not None}

    def to_json(self) -> dict[str, Any]:
        """The tokens without the template (that goes to its own file, readable as it is)."""
        return {"bos": self.bos, "eos": list(self.eos), "pad": self.pad, "eor": self.eor}

    @classmethod
    def from_json(cls, data: Any, source: str, chat_template: str | None = None) -> "SpecialTokens":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object of special tokens")
        unknown = sorted(set(data) - set(NAMES))
        if unknown:
            raise ValueError(f"{source}: unknown special token names {unknown}; known: {list(NAMES)}")
        for name in ("bos", "pad", "eor"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ValueError(f"{source}: {name} must be a token string or null, got {data[name]!r}")
        eos = data.get("eos") or []
        eos = [eos] if isinstance(eos, str) else eos
        if not isinstance(eos, list) or not all(isinstance(t, str) for t in eos):
            raise ValueError(f"{source}: eos must be a token string or a list of them, got {data.get('eos')!r}")
        return cls(data.get("bos"), tuple(eos), data.get("pad"), data.get("eor"), chat_template)


def _token_name(value: Any) -> str | None:
    """tokenizer_config.json writes a token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _ids(value: Any, source: str) -> list[int] | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{source}: expected a token id or a list of ids, got {value!r}")
    return values


def _template_from_tokenizer_config(value: Any, source: str) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
    raise ValueError(f"{source}: chat_template must be a string or a list with a 'default' template")


def read_chat_template(directory: str | Path) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template, else None."""
    directory = Path(directory)
    file = directory / CHAT_TEMPLATE_FILE
    if file.is_file():
        return file.read_text(encoding="utf-8")
    config = directory / TOKENIZER_CONFIG_FILE
    if config.is_file():
        return _template_from_tokenizer_config(read_json(config).get("chat_template"), f"{config}: chat_template")
    return None


def from_files(directory: str | Path | None, tokenizer: Tokenizer) -> SpecialTokens:
    """The special tokens an HF model directory (or a tokenizer directory) names, see the module
    doc; with directory=None, what the tokenizer's own tokenizer_config.json names."""
    directory = Path(directory) if directory is not None else None

    def load(name: str) -> dict[str, Any]:
        file = directory / name if directory is not None else None
        return read_json(file) if file is not None and file.is_file() else {}

    generation, config, grc = load(GENERATION_CONFIG_FILE), load(CONFIG_FILE), load(GRC_CONFIG_FILE)
    tok_config = load(TOKENIZER_CONFIG_FILE) or tokenizer.hf_config

    def token_of(token_id: int, source: str) -> str:
        token = tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(f"{source}: token id {token_id} is not in the tokenizer ({len(tokenizer)} tokens)")
        return token

    def find(name: str) -> list[str] | None:
        for file, data in ((GENERATION_CONFIG_FILE, generation), (CONFIG_FILE, config)):
            if data.get(f"{name}_token_id") is not None:  # data is empty unless the directory has the file
                source = f"{directory / file}: {name}_token_id"
                return [token_of(i, source) for i in _ids(data[f"{name}_token_id"], source)]
        token = _token_name(tok_config.get(f"{name}_token"))
        return [token] if token is not None else None

    found = {name: find(name) for name in ("bos", "eos", "pad")}
    named = any(v is not None for v in found.values()) or bool(generation) or bool(config)
    if not named:  # a bare tokenizer: grc_jax's own defaults, where it has them
        found = {name: [t] if tokenizer.token_to_id(t) is not None else None for name, t in _LEGACY.items()}
    eos = found["eos"] or []
    primary = _token_name(tok_config.get("eos_token"))
    if primary in eos:
        eos = [primary] + [t for t in eos if t != primary]
    eor = _token_name(grc.get("eor_token")) or _token_name(tok_config.get("eor_token"))
    if eor is None:
        eor = next((t for t in EOR_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
    template = read_chat_template(directory) if directory is not None else None
    if template is None and "chat_template" in tokenizer.hf_config:
        template = _template_from_tokenizer_config(tokenizer.hf_config["chat_template"], "tokenizer: chat_template")
    return SpecialTokens(
        bos=(found["bos"] or [None])[0],
        eos=tuple(eos),
        pad=(found["pad"] or [None])[0],
        eor=eor,
        chat_template=template,
    )


def from_tokenizer(tokenizer: Tokenizer) -> SpecialTokens:
    """What a tokenizer alone says (its tokenizer_config.json, else grc_jax's defaults)."""
    return from_files(None, tokenizer)


def from_ids(
    tokenizer: Tokenizer,
    *,
    bos_id: int | None = None,
    eos_ids: int | Sequence[int] | None = None,
    pad_id: int | None = None,
    eor: str | None = FROM_MODEL,
    chat_template: str | None = None,
) -> SpecialTokens:
    """SpecialTokens from token ids (GGUF metadata names tokens by id)."""

    def token(i: int) -> str:
        t = tokenizer.id_to_token(int(i))
        if t is None:
            raise ValueError(f"token id {i} is not in the tokenizer")
        return t

    eos = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    if eor is FROM_MODEL:
        eor = next((t for t in EOR_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
    return SpecialTokens(
        bos=None if bos_id is None else token(bos_id),
        eos=tuple(token(i) for i in eos),
        pad=None if pad_id is None else token(pad_id),
        eor=eor,
        chat_template=chat_template,
    )


def for_training(tokens: SpecialTokens) -> SpecialTokens:
    """Training needs a bos, an eos and a pad: a missing pad is the eos (padding is never
    trained on), a missing bos is the eos too (GPT-2 style), a missing eos or eor is an error."""
    if not tokens.eos:
        raise ValueError("no eos token: the model's files name none; set --config.data.eos_token=")
    if tokens.eor is None:
        raise ValueError(
            f"no end-of-reasoning token: the tokenizer has none of {list(EOR_CANDIDATES)}; set "
            "--config.data.eor_token= to a token it has"
        )
    return dataclasses.replace(tokens, bos=tokens.bos or tokens.eos[0], pad=tokens.pad or tokens.eos[0])


_TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


def template_variables(tokenizer: Tokenizer, tokens: SpecialTokens) -> dict[str, str]:
    """The special tokens a chat template sees: as transformers passes them, the ones the
    tokenizer's tokenizer_config.json names (which may differ from the ids generation stops at);
    for a tokenizer without one, the resolved tokens."""
    config = tokenizer.hf_config
    if not any(k in config for k in _TEMPLATE_TOKEN_KEYS):
        return tokens.template_variables()
    named = {k: _token_name(config.get(k)) for k in _TEMPLATE_TOKEN_KEYS}
    return {k: v for k, v in named.items() if v is not None}


def with_names(tokenizer: Tokenizer, tokens: SpecialTokens) -> Tokenizer:
    """The tokenizer whose tokenizer_config.json names `tokens` (transformers' bos_token,
    eos_token, pad_token), so that what reads it sees the tokens in use; the chat template is
    left out (it is written to its own file)."""
    hf_config = {k: v for k, v in tokenizer.hf_config.items() if k != "chat_template"}
    for key, value in (("bos_token", tokens.bos), ("eos_token", tokens.eos_token), ("pad_token", tokens.pad)):
        if value is None:
            hf_config.pop(key, None)
        else:
            hf_config[key] = value
    return Tokenizer(tokenizer.inner, hf_config)
