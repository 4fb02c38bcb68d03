"""Splitters: every chunk is an exact slice of the document, sizes and overlaps hold, hand-worked fixed splits."""

import pytest

from ragseek.rag.splitters import TOKEN, SplitterConfig, split

TEXT = (
    "Ünïcödé façade — naïve café. 日本語のテキスト。Second sentence here! Third?\n\n"
    "New paragraph with émojis 🎉🎉 and Ελληνικά λέξεις, then more words to split into pieces.\n"
    "Line two: ﬁne-tuning, Straße, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.\n\n\nLast paragraph.\n"
) * 3


@pytest.mark.parametrize("splitter", ["fixed", "recursive", "none"])
@pytest.mark.parametrize("unit, size, overlap", [("chars", 60, 15), ("chars", 200, 0), ("tokens", 12, 3)])
def test_offsets_round_trip(splitter, unit, size, overlap):
    cfg = SplitterConfig(splitter, size, overlap, unit)
    chunks = split("doc", TEXT, cfg)
    assert chunks
    for c in chunks:
        assert TEXT[c.start : c.end] == c.text
        assert c.text == c.text.strip()
    # chunks cover every word, in order
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(TEXT) if not ch.isspace())
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)
    if splitter != "none":
        assert max(len(c.text) if unit == "chars" else len(TOKEN.findall(c.text)) for c in chunks) <= size


def test_fixed_chars_hand_worked():
    chunks = split("d", "abcdefghij", SplitterConfig("fixed", 4, 1, "chars"))
    assert [(c.text, c.start, c.end) for c in chunks] == [("abcd", 0, 4), ("defg", 3, 7), ("ghij", 6, 10)]


def test_fixed_tokens_hand_worked():
    chunks = split("d", "one two, three four five", SplitterConfig("fixed", 3, 1, "tokens"))
    # tokens: one | two | , | three | four | five ; windows of 3 starting every 2 tokens
    assert [c.text for c in chunks] == ["one two,", ", three four", "four five"]


def test_recursive_prefers_paragraphs_then_sentences():
    text = "First para one. First para two.\n\nSecond para is here."
    chunks = split("d", text, SplitterConfig("recursive", 35, 0, "chars"))
    assert [c.text for c in chunks] == ["First para one. First para two.", "Second para is here."]
    chunks = split("d", text, SplitterConfig("recursive", 20, 0, "chars"))
    assert [c.text for c in chunks] == ["First para one.", "First para two.", "Second para is here."]


def test_recursive_overlap_repeats_trailing_pieces():
    text = "Aa aa. Bb bb. Cc cc. Dd dd."
    chunks = split("d", text, SplitterConfig("recursive", 13, 6, "chars"))
    assert [c.text for c in chunks] == ["Aa aa. Bb bb.", "Bb bb. Cc cc.", "Cc cc. Dd dd."]


def test_overlap_must_be_smaller_than_size():
    with pytest.raises(ValueError, match="chunk_overlap"):
        SplitterConfig("fixed", 10, 10)
