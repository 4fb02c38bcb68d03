"""Loaders and cleaning: the cleaned text maps back to the raw text; bad files raise DocumentError with a reason."""

from pathlib import Path

import pytest

from ragseek.rag.documents import DocumentError, clean, html_to_text, load_beir_rows, load_file

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
