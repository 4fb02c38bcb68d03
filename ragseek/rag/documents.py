"""Loaders (.txt, .md, .html, .pdf, BEIR .jsonl) and cleaning that keeps the map back to the original text.

`clean(raw)` returns the cleaned text and, for every cleaned character, the index of the raw character it came
from, so a chunk's span `[start, end)` in the cleaned text maps back to `raw[offsets[start]:offsets[end - 1] + 1]`.
Cleaning steps, in order: Unicode NFC (per base character + its combining marks), control and format characters
dropped (tab becomes a space, CR LF becomes LF), de-hyphenation of `word-\\nword`, whitespace collapsed (runs of
spaces to one, three or more newlines to a paragraph break), ends stripped.

Files are read as a stream of blocks (`BLOCK_BYTES`): `clean_stream` cleans each block alone, cutting only between
two word characters, where no cleaning step reaches across, so its pieces join into exactly `clean(whole)`, and a
50 MB file never holds a per-character Python list. A document's source is its canonical absolute path
(`source_name`); a file name that is not UTF-8 keeps its undecodable bytes as `\\xNN` escapes.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import itertools
import json
import os
import re
import stat
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl")
# a text file is read, decoded and cleaned this many bytes at a time
BLOCK_BYTES = 1 << 20


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


def _clean_unstripped(raw: str) -> tuple[str, list[int]]:
    text, mapping = _nfc(raw)
    text, mapping = _sub(_CONTROL, _control, text, mapping)
    text, mapping = _sub(_HYPHEN, lambda m: "", text, mapping)
    text, mapping = _sub(_AROUND_NEWLINE, lambda m: "\n", text, mapping)
    text, mapping = _sub(_SPACES, lambda m: " ", text, mapping)
    return _sub(_NEWLINES, lambda m: "\n\n", text, mapping)


def clean(raw: str) -> tuple[str, np.ndarray]:
    """Cleaned text and `offsets` (int32, one raw index per cleaned char); see the module docstring."""
    text, mapping = _clean_unstripped(raw)
    lead = len(text) - len(text.lstrip())
    stripped = text.strip()
    return stripped, np.asarray(mapping[lead : lead + len(stripped)], dtype=np.int32)


def _cut(raw: str, look: int = 1 << 16) -> int:
    """The last index i (within the final `look` chars) where `raw[i - 1]` and `raw[i]` are word characters and
    `raw[i]` no combining mark: no cleaning step reaches across it (each rewrites only whitespace, control
    characters, hyphens and combining marks), so cleaning `raw[:i]` and `raw[i:]` apart is cleaning `raw`. 0: none."""
    for i in range(len(raw) - 1, max(0, len(raw) - look), -1):
        if raw[i].isalnum() and raw[i - 1].isalnum() and not unicodedata.combining(raw[i]):
            return i
    return 0


def clean_stream(blocks: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    """`clean` of the concatenated `blocks`, in pieces: the pieces' texts join into `clean("".join(blocks))[0]`
    and their int32 offsets (into the concatenated raw text) into its offsets. A block is cleaned up to its last
    safe cut (`_cut`); the rest waits for the next one. Whitespace at a piece's end is held back until text
    follows it, so the stream's ends are stripped as `clean` strips them."""
    buf, base, started = "", 0, False
    held_text, held_offsets = "", np.zeros(0, np.int64)
    for block in itertools.chain(blocks, [None]):
        if block is not None:
            buf += block
            cut = _cut(buf)
            if not cut:
                continue
            raw, buf = buf[:cut], buf[cut:]
        else:
            raw, buf = buf, ""
        text, mapping = _clean_unstripped(raw)
        offsets = np.asarray(mapping, dtype=np.int64) + base
        base += len(raw)
        if not started:
            lead = len(text) - len(text.lstrip())
            text, offsets = text[lead:], offsets[lead:]
        body = len(text.rstrip())
        if body:
            started = True
            yield held_text + text[:body], np.concatenate([held_offsets, offsets[:body]]).astype(np.int32)
            held_text, held_offsets = text[body:], offsets[body:]
        else:
            held_text, held_offsets = held_text + text, np.concatenate([held_offsets, offsets])


# --- loaders --------------------------------------------------------------------------------------------


def display(path: str | os.PathLike) -> str:
    """A path as text that can be stored and printed: a byte of its name that is not UTF-8 is written `\\xNN`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def source_name(path: Path) -> str:
    """What a document stores as its source: the canonical absolute path (symlinks resolved), as `display` writes
    it, so `--prune` run from any folder checks the same file."""
    return display(path.resolve())


def source_paths(source: str) -> list[Path]:
    """The paths a stored source may name: itself, and, when it holds `\\xNN` escapes, the path with those bytes."""
    paths = [Path(source)]
    if "\\x" in source:
        raw = re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m[1], 16)]), source.encode("utf-8"))
        paths.append(Path(os.fsdecode(raw)))
    return paths


def _text_blocks(path: Path) -> Iterator[str]:
    """The file's text, decoded `BLOCK_BYTES` at a time (a UTF-8 BOM dropped); DocumentError for a binary file or
    bytes that are not UTF-8, naming the byte."""
    with open(path, "rb") as f:
        if b"\x00" in f.read(8192):
            raise DocumentError("binary file (NUL bytes): not a text document")
        f.seek(0)
        decoder, done = codecs.getincrementaldecoder("utf-8")(), 0
        if f.read(3) != codecs.BOM_UTF8:
            f.seek(0)
        else:
            done = 3
        while True:
            data = f.read(BLOCK_BYTES)
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                at = done - pending + e.start
                raise DocumentError(
                    f"undecodable: not UTF-8 ({e.reason} at byte {at}); convert it to UTF-8"
                ) from e
            done += len(data)
            if text:
                yield text
            if not data:
                return


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


def _html_text(blocks: Iterable[str]) -> Iterator[str]:
    """The text of an HTML page given in blocks, as the parser finds it."""
    parser = _HTMLText()
    for block in blocks:
        parser.feed(block)
        yield "".join(parser.parts)
        parser.parts.clear()
    parser.close()
    yield "".join(parser.parts)


def html_to_text(html: str) -> str:
    return "".join(_html_text([html]))


def _pdf_pages(path: Path) -> Iterator[str]:
    """The text of each page (pypdf), pages joined by a blank line."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        for i, page in enumerate(PdfReader(path).pages):
            yield ("\n\n" if i else "") + (page.extract_text() or "")
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as e:
        raise DocumentError(f"corrupt PDF: {e}") from e


def _assemble(pieces: Iterable[tuple[str, np.ndarray]], size_hint: int) -> tuple[str, np.ndarray]:
    """`clean_stream`'s pieces joined: the text, and the offsets filled into one int32 array (grown if needed)."""
    texts, offsets, n = [], np.empty(max(size_hint, 1), np.int32), 0
    for text, off in pieces:
        if n + len(off) > len(offsets):
            offsets = np.resize(offsets, 2 * (n + len(off)))
        offsets[n : n + len(off)] = off
        texts.append(text)
        n += len(off)
    return "".join(texts), offsets[:n]


def load_beir_rows(path: Path, with_title: bool = True) -> Iterator[Document]:
    """BEIR corpus rows `{"_id", "title", "text", "metadata"}`; with_title prepends the title as a first paragraph.
    A document is the row's `_id` in this file (`source_name(path)`): an `_id` twice in one file is an error."""
    source, first = source_name(path), {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                doc_id, title, body = str(row["_id"]), row.get("title") or "", row["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DocumentError(f"line {lineno}: not a BEIR corpus row ({e})") from e
            if first.setdefault(doc_id, lineno) != lineno:
                raise DocumentError(
                    f"line {lineno}: _id {doc_id!r} repeats line {first[doc_id]}: one row per _id"
                )
            raw = f"{title}\n\n{body}" if with_title and title else body
            text, offsets = clean(raw)
            yield Document(
                doc_id, text, source, title=title, metadata=row.get("metadata") or {}, offsets=offsets
            )


def load_file(path: Path) -> list[Document]:
    """The documents in one file (one, or one per row for .jsonl); raises DocumentError with the reason. A text,
    HTML or PDF file is read and cleaned as a stream of blocks (`clean_stream`)."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DocumentError(f"unsupported file type {suffix!r}: use one of {', '.join(SUFFIXES)}")
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise DocumentError("not a regular file (a folder, pipe or device)")
    if info.st_size == 0:
        raise DocumentError("empty file")
    if suffix == ".jsonl":
        return list(load_beir_rows(path))
    if suffix == ".pdf":
        blocks = _pdf_pages(path)
    else:
        blocks = _html_text(_text_blocks(path)) if suffix in (".html", ".htm") else _text_blocks(path)
    text, offsets = _assemble(clean_stream(blocks), info.st_size)
    if not text:
        raise DocumentError("empty: no text after cleaning")
    source = source_name(path)
    return [Document(source, text, source, title=display(path.stem), offsets=offsets)]


def path_problem(path: Path) -> str | None:
    """Why `path` cannot be read (missing, a dangling link, a symlink loop, no permission), or None."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            return f"dangling symlink to {display(os.readlink(path))}"
        return "no such file or folder"
    except OSError as e:
        return "symlink loop" if e.errno == errno.ELOOP else f"unreadable: {e.strerror}"
    return None


def find_files(paths: list[Path] | list[str]) -> tuple[list[Path], list[dict], list[dict]]:
    """The files under `paths` to ingest, in a stable order (each once), the files a folder walk left out on
    purpose, and the paths that failed (both lists of {"path", "reason"}).

    A folder is walked recursively in sorted order for the types ragseek reads (SUFFIXES; hidden names skipped,
    images and the like ignored), following links to folders. A BEIR folder's queries.jsonl (beside its
    corpus.jsonl) holds questions, not documents, and is left out. Failures, each named: a path that does not
    exist, a dangling link, a symlink loop (a link back to a folder being walked), a folder or path that cannot
    be read. A file named explicitly is always returned, so an unsupported one is reported with the reason."""
    found: list[Path] = []
    left_out: list[dict] = []
    failed: list[dict] = []
    files: set[str] = set()
    walked: set[tuple[int, int]] = set()

    def add(path: Path) -> None:
        if (real := os.path.realpath(path)) not in files:
            files.add(real)
            found.append(path)

    def walk(folder: Path, chain: tuple[tuple[int, int], ...]) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            failed.append({"path": display(folder), "reason": f"unreadable folder: {e.strerror}"})
            return
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            problem = path_problem(path)
            if problem:
                failed.append({"path": display(path), "reason": problem})
                continue
            info = path.stat()
            if stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                real = display(os.path.realpath(path))
                if key in chain:
                    failed.append({"path": display(path), "reason": f"symlink loop: back to {real}"})
                elif key in walked:
                    left_out.append({"path": display(path), "reason": f"a link to {real}, walked already"})
                else:
                    walked.add(key)
                    walk(path, (*chain, key))
            elif path.suffix.lower() not in SUFFIXES:
                continue
            elif entry.name == "queries.jsonl" and (folder / "corpus.jsonl").is_file():
                reason = (
                    "BEIR queries beside corpus.jsonl: questions, not documents (name the file to ingest it)"
                )
                left_out.append({"path": display(path), "reason": reason})
            else:
                add(path)

    for p in map(Path, paths):  # str or Path
        problem = path_problem(p)
        if problem:
            failed.append({"path": display(p), "reason": problem})
        elif p.is_dir():
            key = (p.stat().st_dev, p.stat().st_ino)
            if key not in walked:
                walked.add(key)
                walk(p, (key,))
        else:
            add(p)
    return found, left_out, failed
