"""Text splitters: the lecture's naive fixed-length split, and "better: split on new lines, include chunk overlap".

Every chunk is a slice of the cleaned document: `doc.text[chunk.start:chunk.end] == chunk.text`, so a citation can
show the exact span. Sizes are in characters or in tokens (a token is a word or a punctuation mark, `\\w+|[^\\w\\s]`;
MiniLM's WordPiece makes about 1.3 pieces of one).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ragseek.config import config_field as _f

Unit = Literal["chars", "tokens"]
SplitterKind = Literal["fixed", "recursive", "none"]
TOKEN = re.compile(r"\w+|[^\w\s]")
# paragraph → line → sentence → word: each level is tried only on pieces still longer than chunk_size
SEPARATORS = (re.compile(r"\n\n+"), re.compile(r"\n"), re.compile(r"(?<=[.!?])\s+"), re.compile(r"\s+"))


@dataclass
class SplitterConfig:
    splitter: SplitterKind = _f(
        "recursive", "fixed: windows of chunk_size; recursive: paragraph→line→sentence→word; none: whole doc"
    )
    chunk_size: int = _f(1000, "largest chunk, in --unit")
    chunk_overlap: int = _f(150, "text shared by consecutive chunks, in --unit")
    unit: Unit = _f("chars", "chars, or tokens (words and punctuation marks)")

    def __post_init__(self) -> None:
        if not 0 <= self.chunk_overlap < self.chunk_size:
            raise ValueError(
                f"chunk_overlap={self.chunk_overlap} must be >= 0 and < chunk_size={self.chunk_size}: lower it"
            )


@dataclass(frozen=True)
class Chunk:
    doc_id: str
    text: str
    start: int  # char offsets into the cleaned document
    end: int


class _Measure:
    """Length of a span `[start, end)` of `text` in the chosen unit, in O(log n) for tokens."""

    def __init__(self, text: str, unit: Unit) -> None:
        self.unit = unit
        if unit == "tokens":
            spans = [m.span() for m in TOKEN.finditer(text)]
            self.starts = [s for s, _ in spans]
            self.ends = [e for _, e in spans]

    def __call__(self, start: int, end: int) -> int:
        if self.unit == "chars":
            return end - start
        # tokens that start inside the span
        return bisect.bisect_left(self.starts, end) - bisect.bisect_left(self.starts, start)


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _chunks(doc_id: str, text: str, spans: list[tuple[int, int]]) -> list[Chunk]:
    out = []
    for s, e in spans:
        s, e = _strip(text, s, e)
        if s < e:
            out.append(Chunk(doc_id, text[s:e], s, e))
    return out


def split_fixed(doc_id: str, text: str, cfg: SplitterConfig) -> list[Chunk]:
    """Naive split: windows of `chunk_size` units, each starting `chunk_size - chunk_overlap` after the previous."""
    step = cfg.chunk_size - cfg.chunk_overlap
    if cfg.unit == "chars":
        bounds = [
            (i, min(i + cfg.chunk_size, len(text)))
            for i in range(0, max(len(text) - cfg.chunk_overlap, 1), step)
        ]
    else:
        toks = [m.span() for m in TOKEN.finditer(text)]
        last = max(len(toks) - cfg.chunk_overlap, 1)
        bounds = [
            (toks[i][0], toks[min(i + cfg.chunk_size, len(toks)) - 1][1])
            for i in range(0, last, step)
            if toks
        ]
    return _chunks(doc_id, text, bounds)


def _pieces(text: str, start: int, end: int, size: int, measure: Callable[[int, int], int], level: int = 0):
    """Spans covering `[start, end)` whose length is <= size, cut at the coarsest separator that gets there."""
    start, end = _strip(text, start, end)
    if start == end:
        return []
    if measure(start, end) <= size:
        return [(start, end)]
    if level == len(SEPARATORS):  # one unsplittable word longer than size: cut it by characters
        return (
            [(i, min(i + size, end)) for i in range(start, end, size)]
            if measure.unit == "chars"
            else [(start, end)]
        )
    cuts = [m.end() for m in SEPARATORS[level].finditer(text, start, end) if start < m.end() < end]
    out = []
    for s, e in zip([start, *cuts], [*cuts, end], strict=True):
        out.extend(_pieces(text, s, e, size, measure, level + 1))
    return out


def split_recursive(doc_id: str, text: str, cfg: SplitterConfig) -> list[Chunk]:
    """Cut at paragraphs, then lines, sentences, words; merge neighbouring pieces up to chunk_size; each new chunk
    starts with the trailing pieces of the previous one that fit in chunk_overlap."""
    measure = _Measure(text, cfg.unit)
    pieces = _pieces(text, 0, len(text), cfg.chunk_size, measure)
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(pieces):
        j = i + 1
        while j < len(pieces) and measure(pieces[i][0], pieces[j][1]) <= cfg.chunk_size:
            j += 1
        spans.append((pieces[i][0], pieces[j - 1][1]))
        if j == len(pieces):
            break
        # step back over pieces that fit in the overlap, but always move forward
        k = j
        while k - 1 > i and measure(pieces[k - 1][0], pieces[j - 1][1]) <= cfg.chunk_overlap:
            k -= 1
        i = k
    return _chunks(doc_id, text, spans)


def split_none(doc_id: str, text: str, cfg: SplitterConfig) -> list[Chunk]:
    """The whole document as one chunk."""
    return _chunks(doc_id, text, [(0, len(text))])


SPLITTERS: dict[str, Callable[[str, str, SplitterConfig], list[Chunk]]] = {
    "fixed": split_fixed,
    "recursive": split_recursive,
    "none": split_none,
}


def split(doc_id: str, text: str, cfg: SplitterConfig) -> list[Chunk]:
    return SPLITTERS[cfg.splitter](doc_id, text, cfg)


WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens: what BM25's analyzer and the word-vector embedders see."""
    return WORD.findall(text.lower())
