"""Loaders and cleaning: the cleaned text maps back to the raw text; bad files raise DocumentError with a reason."""

import random
from pathlib import Path

import numpy as np
import pytest

from ragseek.rag import documents
from ragseek.rag.documents import DocumentError, clean, clean_stream, html_to_text, load_beir_rows, load_file

DATA = Path(__file__).parent / "data"
RAW = "  Cafe\u0301\u00a0na\u00efve\tco-\noperation\r\n\r\n\r\n\r\nThe   \u00e9nd\x07 of\u200b 日本語  \ufb01ne-\n  tuning  "


def test_clean_hand_worked():
    text, _ = clean(RAW)
    # NFC composes e + U+0301; NBSP and tab become spaces; the bell and zero-width space go; "co-\noperation" is
    # de-hyphenated; four CRLFs become one paragraph break; runs of spaces collapse; ends are stripped
    assert text == "Café naïve cooperation\n\nThe énd of 日本語 \ufb01netuning"


def test_clean_offsets_map_back_to_raw():
    text, offsets = clean(RAW)
    assert len(offsets) == len(text)
    assert all(offsets[i] < offsets[i + 1] for i in range(len(text) - 1))  # order is kept
    for i, ch in enumerate(text):
        src = RAW[offsets[i]]
        if ch.isalnum():  # letters come from the same letter (or its decomposed base)
            assert src == ch or ch.startswith(src) or src == "e" and ch == "é"
    # a word's cleaned span maps back to the same word in the raw text
    s = text.index("cooperation")
    assert RAW[offsets[s] : offsets[s + len("cooperation") - 1] + 1] == "co-\noperation"


def test_html_drops_scripts_and_styles():
    html = "<html><head><style>p{}</style><title>t</title></head><body><p>One &amp; two</p><script>x()</script><p>three</p></body></html>"
    assert clean(html_to_text(html))[0] == "One & two\n\nthree"


@pytest.mark.parametrize(
    "html",
    [
        # valid HTML: the end tags of head (and body, html) are optional; <body> or any body element closes head
        "<html><head><title>t</title><meta charset=utf-8><body><p>One &amp; two</p><p>three</p>",
        "<!DOCTYPE html><head><title>t</title><link rel=icon href=x.png><p>One &amp; two<p>three",
        "<head><style>p{}</style><script>x()</script>One &amp; two<br><br>three",
    ],
)
def test_html_with_an_unclosed_head_keeps_its_body(html):
    assert clean(html_to_text(html))[0] == "One & two\n\nthree"


def test_pdf_loader_reads_text():
    (doc,) = load_file(DATA / "page.pdf")
    assert doc.text == "Retrieval from a PDF page."


def test_beir_rows_prepend_title():
    docs = list(load_beir_rows(DATA / "beir" / "corpus.jsonl"))
    assert [d.doc_id for d in docs] == ["d1", "d2", "d3", "d4", "d5"]
    assert docs[0].text.startswith("Aspirin and heart attacks\n\nDaily low-dose aspirin")


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.txt", b"", "empty file"),
        ("blank.md", b"  \n\t\n", "empty: no text after cleaning"),
        ("bin.txt", b"\x00\x01\x02ELF", "binary file"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "undecodable: not UTF-8"),
        ("broken.pdf", b"%PDF-1.4\n1 0 obj <<", "corrupt PDF"),
        ("notes.docx", b"PK\x03\x04", "unsupported file type"),
    ],
)
def test_bad_files_raise_with_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DocumentError, match=reason):
        load_file(path)


def test_clean_stream_is_clean_whatever_the_blocks():
    """Cleaning block by block joins into exactly `clean` of the whole (text and offsets), wherever the blocks
    are cut: through CR LF, a hyphenated line end, a run of spaces or newlines, a letter and its combining mark."""
    rng = random.Random(0)
    parts = [
        *"ab cD-\n\r\t.",
        "e\u0301",
        "\u00a0",
        "\u200b",
        "\x07",
        "日本",
        "  ",
        "\n\n\n",
        "-\n",
        "co-\n  op",
        "\ufeff",
    ]
    for _ in range(2000):
        raw = "".join(rng.choice(parts) for _ in range(rng.randint(0, 60)))
        cuts = sorted(rng.sample(range(len(raw) + 1), min(len(raw) + 1, rng.randint(0, 8))))
        blocks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        pieces = list(clean_stream(blocks))
        text, offsets = clean(raw)
        assert "".join(p for p, _ in pieces) == text, blocks
        assert np.concatenate([o for _, o in pieces] or [np.zeros(0, np.int32)]).tolist() == offsets.tolist()


def test_a_text_file_is_read_and_cleaned_as_a_stream(tmp_path, monkeypatch):
    """A text file is decoded and cleaned BLOCK_BYTES at a time, never as one string with a per-character map:
    with 64-byte blocks the document is the same as cleaning the whole file at once, built from many pieces."""
    raw = (
        "\ufeffCafe\u0301 notes\r\n\r\n\r\n"
        + "The co-\nhort grew   with   time.\n" * 300
        + "  \u00e9nd  \n\n"
    )
    path = tmp_path / "notes.txt"
    path.write_bytes(raw.encode("utf-8"))
    pieces = []
    stream = documents.clean_stream
    monkeypatch.setattr(
        documents, "clean_stream", lambda blocks: (pieces.append(p) or p for p in stream(blocks))
    )
    monkeypatch.setattr(documents, "BLOCK_BYTES", 64)
    (doc,) = load_file(path)
    text, offsets = clean(raw[1:])  # the BOM is not text
    assert doc.text == text and doc.offsets.tolist() == offsets.tolist()
    assert len(pieces) > len(raw.encode()) // 64 // 2  # the stream, one piece per block or so
    latin1 = tmp_path / "late.txt"
    latin1.write_bytes(b"plain ascii " * 20 + "caf\u00e9".encode("latin-1"))
    with pytest.raises(DocumentError, match="at byte 243"):  # counted over the whole file, not within a block
        load_file(latin1)
