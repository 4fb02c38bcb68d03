"""Loaders (.txt, .md, .html, .pdf, BEIR .jsonl) and cleaning that keeps the map back to the original text.

`clean(raw)` returns the cleaned text and, for every cleaned character, the index of the raw character it came
from, so a chunk's span `[start, end)` in the cleaned text maps back to `raw[offsets[start]:offsets[end - 1] + 1]`.
Cleaning steps, in order: Unicode NFC (per base character + its combining marks), control and format characters
dropped (tab becomes a space, CR LF becomes LF), de-hyphenation of `word-\\nword`, whitespace collapsed (runs of
spaces to one, three or more newlines to a paragraph break), ends stripped.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl")


class DocumentError(ValueError):
    """A file that cannot become a document; the message is the reason shown to the user."""


@dataclass
class Document:
    """A cleaned document: `text` is what chunks index into; `offsets[i]` is the raw index of `text[i]`."""

    doc_id: str
    text: str
    source: str
    title: str = ""
    metadata: dict = field(default_factory=dict)
    offsets: np.ndarray | None = None  # int32 (len(text),), None when text is the raw text

    @property
    def content_hash(self) -> str:
        return content_hash(self.title + "\x00" + self.text)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- cleaning -------------------------------------------------------------------------------------------


def _nfc(raw: str) -> tuple[str, list[int]]:
    """NFC per segment (a base character and the combining marks after it); each output char maps to its segment."""
    out: list[str] = []
    mapping: list[int] = []
    start = 0
    for i in range(1, len(raw) + 1):
        if i == len(raw) or not unicodedata.combining(raw[i]):
            piece = unicodedata.normalize("NFC", raw[start:i])
            out.append(piece)
            mapping.extend([start] * len(piece))
            start = i
    return "".join(out), mapping


def _sub(pattern: re.Pattern, repl: Callable[[re.Match], str], text: str, mapping: list[int]):
    """`pattern.sub(repl, text)` that also rewrites the char → raw-index mapping (new chars map to the match start)."""
    out: list[str] = []
    new_map: list[int] = []
    last = 0
    for m in pattern.finditer(text):
        out.append(text[last : m.start()])
        new_map.extend(mapping[last : m.start()])
        r = repl(m)
        # a replacement found inside the match (" " out of "   ", "\n" out of " \n ") keeps those chars' mapping
        at = m.group(0).find(r)
        if at >= 0:
            new_map.extend(mapping[m.start() + at : m.start() + at + len(r)])
        else:
            new_map.extend([mapping[m.start()]] * len(r))
        out.append(r)
        last = m.end()
    out.append(text[last:])
    new_map.extend(mapping[last:])
    return "".join(out), new_map


_CONTROL = re.compile(r"\r\n|[^\S\n ]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2060\ufeff]")
_HYPHEN = re.compile(r"(?<=\w)-[ ]*\n[ ]*(?=[a-z])")
_AROUND_NEWLINE = re.compile(r" *\n *")
_SPACES = re.compile(r" {2,}")
_NEWLINES = re.compile(r"\n{3,}")


def _control(m: re.Match) -> str:
    s = m.group(0)
    if s == "\r\n" or s == "\r":
        return "\n"
    return " " if s.isspace() else ""


def clean(raw: str) -> tuple[str, np.ndarray]:
    """Cleaned text and `offsets` (int32, one raw index per cleaned char); see the module docstring."""
    text, mapping = _nfc(raw)
    text, mapping = _sub(_CONTROL, _control, text, mapping)
    text, mapping = _sub(_HYPHEN, lambda m: "", text, mapping)
    text, mapping = _sub(_AROUND_NEWLINE, lambda m: "\n", text, mapping)
    text, mapping = _sub(_SPACES, lambda m: " ", text, mapping)
    text, mapping = _sub(_NEWLINES, lambda m: "\n\n", text, mapping)
    lead = len(text) - len(text.lstrip())
    stripped = text.strip()
    return stripped, np.asarray(mapping[lead : lead + len(stripped)], dtype=np.int32)


# --- loaders --------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise DocumentError("binary file (NUL bytes): not a text document")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(
            f"undecodable: not UTF-8 ({e.reason} at byte {e.start}); convert it to UTF-8"
        ) from e


class _HTMLText(HTMLParser):
    """Text of an HTML page: head, script, style and title contents dropped, block elements end a line.

    The head ends at </head>, or as in a browser (HTML's optional end tags) at <body>, at any element that cannot
    be in a head (<p>, <div>, ...), or at text that is not whitespace."""

    SKIP = {"script", "style", "noscript", "template", "title"}
    HEAD = {"base", "basefont", "bgsound", "link", "meta", "noframes", *SKIP}
    BLOCK = {
        "p",
        "div",
        "br",
        "li",
        "tr",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "section",
        "article",
        "pre",
        "table",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0
        self.in_head = False

    def handle_starttag(self, tag, attrs):
        if tag == "head":
            self.in_head = True
        elif tag not in self.HEAD:
            self.in_head = False
        if tag in self.SKIP:
            self.skipping += 1
        # a block starts a paragraph: </p> and </li> are optional
        elif tag in self.BLOCK:
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag):
        if tag == "head":
            self.in_head = False
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_data(self, data):
        if self.skipping:
            return
        if self.in_head and data.strip():
            self.in_head = False
        if not self.in_head:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def _read_pdf(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as e:
        raise DocumentError(f"corrupt PDF: {e}") from e


def _make(doc_id: str, raw: str, source: str, title: str = "", metadata: dict | None = None) -> Document:
    text, offsets = clean(raw)
    if not text:
        raise DocumentError("empty: no text after cleaning")
    return Document(doc_id, text, source, title=title, metadata=metadata or {}, offsets=offsets)


def load_beir_rows(path: Path, with_title: bool = True) -> Iterator[Document]:
    """BEIR corpus rows `{"_id", "title", "text", "metadata"}`; with_title prepends the title as a first paragraph."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                doc_id, title, body = str(row["_id"]), row.get("title") or "", row["text"]
            except (json.JSONDecodeError, KeyError) as e:
                raise DocumentError(f"line {lineno}: not a BEIR corpus row ({e})") from e
            raw = f"{title}\n\n{body}" if with_title and title else body
            text, offsets = clean(raw)
            yield Document(
                doc_id, text, str(path), title=title, metadata=row.get("metadata") or {}, offsets=offsets
            )


def load_file(path: Path) -> list[Document]:
    """The documents in one file (one, or one per row for .jsonl); raises DocumentError with the reason."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DocumentError(f"unsupported file type {suffix!r}: use one of {', '.join(SUFFIXES)}")
    if path.stat().st_size == 0:
        raise DocumentError("empty file")
    source = str(path.resolve())
    if suffix == ".jsonl":
        return list(load_beir_rows(path))
    if suffix == ".pdf":
        return [_make(source, _read_pdf(path), source, title=path.stem)]
    text = _read_text(path)
    if suffix in (".html", ".htm"):
        text = html_to_text(text)
    return [_make(source, text, source, title=path.stem)]


def find_files(paths: list[Path]) -> tuple[list[Path], list[dict]]:
    """Files under each path, in a stable order, and the files a folder walk left out on purpose ({"path",
    "reason"}). Directories are walked recursively for the types ragseek reads (SUFFIXES; hidden files skipped,
    images and the like ignored); a BEIR folder's queries.jsonl (beside its corpus.jsonl) holds questions, not
    documents, and is left out. A file named explicitly is always returned, so an unsupported one is reported as
    failed with the reason."""
    found: list[Path] = []
    left_out: list[dict] = []
    for p in paths:
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if (
                    not f.is_file()
                    or f.suffix.lower() not in SUFFIXES
                    or any(part.startswith(".") for part in f.relative_to(p).parts)
                ):
                    continue
                if f.name == "queries.jsonl" and (f.parent / "corpus.jsonl").is_file():
                    reason = "BEIR queries beside corpus.jsonl: questions, not documents (name the file to ingest it)"
                    left_out.append({"path": str(f), "reason": reason})
                    continue
                found.append(f)
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return found, left_out
