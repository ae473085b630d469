"""Chat templates rendered as transformers' `apply_chat_template(..., tokenize=False)` renders them.

A model's chat template is a Jinja program from its own files (chat_template.jinja,
tokenizer_config.json or GGUF metadata), so it is untrusted: it runs in jinja2's immutable
sandbox with the environment transformers gives templates (trim_blocks, lstrip_blocks, loop
controls, a `{% generation %}` block, a `tojson` that does not escape HTML, `raise_exception`,
`strftime_now`). Also here: cutting generated text at stop strings.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Mapping
from typing import Any, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning may arrive under; templates read `reasoning_content` (some `thinking`).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; when
    rendering a prompt it only has to render its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template (cached: an Engine renders the same one for every request)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template line {e.lineno}: {e.message}") from None


def _plain(value: Any) -> Any:
    """Messages as plain JSON-like data (dataclasses and pydantic models become dicts), so the
    sandboxed template sees no object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    for kind in (str, bool, int, float):
        if isinstance(value, kind):
            return kind(value)
    raise TypeError(f"chat messages hold plain data only, not {type(value).__name__}")


def _normalise(messages: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for i, message in enumerate(messages):
        message = _plain(message)
        if not isinstance(message, dict):
            raise TypeError(f"chat message {i} must be a dict with 'role' and 'content', got {message!r}")
        # None-valued keys (OpenAI's content=None, tool_calls=None) are dropped: templates test for presence
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat(
    template: str, messages: list[dict], *, add_generation_prompt: bool = True, **special_tokens_and_kwargs: Any
) -> str:
    """The prompt text `template` makes of `messages`. Keyword arguments are the template's
    variables besides `messages` and `add_generation_prompt`: the tokenizer's special tokens
    (bos_token, eos_token, pad_token, ...) as transformers passes them, and any other a template
    reads (tools, documents, enable_thinking, ...)."""
    if not messages:
        raise ValueError("a chat needs at least one message")
    variables = {"tools": None, "documents": None, **special_tokens_and_kwargs}
    try:
        return compile_template(template).render(
            messages=_normalise(messages), add_generation_prompt=add_generation_prompt, **_plain(variables)
        )
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None


# --- stop strings ---------------------------------------------------------------------------


def as_stop_list(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """OpenAI's `stop`: one string or a list of them; empty strings are refused."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    return stops


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one was found)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def safe_prefix_length(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be shown while streaming: all but a tail that may be the start
    of a stop string the next tokens complete."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return len(text) - hold
