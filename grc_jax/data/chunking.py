"""Cutting documents into chunks of at most P tokens of the model's tokenizer, on the original text.

Chunks are character spans of the input, cut at token boundaries and, where a word boundary is
near, at a word boundary, so a chunk is the document's own text and re-tokenizes to at most P
tokens. Without a tokenizer, "tokens" are whitespace-separated words.
"""

from __future__ import annotations

import re
from typing import Sequence

from grc_jax.tokenizer import Tokenizer

_WORD = re.compile(r"\S+")


class Chunker:
    """Counts tokens and cuts texts into chunks of at most `max_len` tokens."""

    def __init__(self, tokenizer: Tokenizer | None, max_len: int):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.unit = "tokens" if tokenizer is not None else "words"

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Each token's character span in `text`."""
        if self.tokenizer is None:
            return [m.span() for m in _WORD.finditer(text)]
        return [tuple(o) for o in self.tokenizer.inner.encode(text, add_special_tokens=False).offsets]

    def count(self, text: str) -> int:
        return len(self.offsets(text)) if self.tokenizer is None else len(self.tokenizer.encode(text))

    def counts(self, texts: Sequence[str]) -> list[int]:
        if self.tokenizer is None:
            return [self.count(t) for t in texts]
        return [len(ids) for ids in self.tokenizer.encode_batch(list(texts))]

    def spans(self, text: str) -> list[tuple[int, int]]:
        """The chunks' character spans, in order, covering every token of `text`."""
        offsets = self.offsets(text)
        spans: list[tuple[int, int]] = []
        i = 0
        while i < len(offsets):
            n = self._fit(text, offsets, i, min(self.max_len, len(offsets) - i))
            spans.append(_strip(text, offsets[i][0], offsets[i + n - 1][1]))
            i += n
        return [s for s in spans if s[1] > s[0]]

    def chunks(self, text: str) -> list[str]:
        return [text[a:b] for a, b in self.spans(text)]

    def window(self, text: str, start: int, end: int) -> tuple[int, int] | None:
        """A span of at most max_len tokens that holds characters [start, end) (an answer), as
        centred on it as the text allows; None if the answer alone is longer than max_len."""
        offsets = self.offsets(text)
        inside = [t for t, (a, b) in enumerate(offsets) if b > start and a < end]
        if not inside:
            return None
        first, last = inside[0], inside[-1]
        need = last - first + 1
        if need > self.max_len:
            return None
        lo = max(0, min(first - (self.max_len - need) // 2, len(offsets) - self.max_len))
        hi = min(len(offsets), lo + self.max_len)  # tokens [lo, hi)
        while True:
            if not self._too_long(text, offsets[lo][0], offsets[hi - 1][1]) or (lo == first and hi == last + 1):
                return _strip(text, offsets[lo][0], offsets[hi - 1][1])
            if hi - 1 > last:  # re-tokenized text came out longer: give up a token on either side
                hi -= 1
            else:
                lo += 1

    def _fit(self, text: str, offsets: list[tuple[int, int]], i: int, n: int) -> int:
        """The number of tokens from i the chunk takes: at most n, ending at a word boundary when
        one is within the last half, and re-tokenizing to at most max_len tokens."""
        if i + n < len(offsets):
            for m in range(n, max(1, n - n // 2) - 1, -1):
                if _word_boundary(text, offsets, i + m):
                    n = m
                    break
        while n > 1 and self._too_long(text, offsets[i][0], offsets[i + n - 1][1]):
            n -= 1
        return n

    def _too_long(self, text: str, a: int, b: int) -> bool:
        # Counted as stored: stripped, since a leading space can change how the first word splits.
        a, b = _strip(text, a, b)
        return self.count(text[a:b]) > self.max_len


def _word_boundary(text: str, offsets: list[tuple[int, int]], t: int) -> bool:
    """Whether a cut before token t falls between words."""
    start = offsets[t][0]
    return start > offsets[t - 1][1] or start == 0 or text[start - 1].isspace() or text[start].isspace()


def _strip(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b
