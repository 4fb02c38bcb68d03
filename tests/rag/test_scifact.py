"""Slow: the plain BM25 floor on BEIR SciFact (train qrels, 809 queries), through the CLI, against the issue's anchor."""

import json

import pytest
from typer.testing import CliRunner

from ragseek.cli import app


@pytest.mark.slow
def test_scifact_bm25_floor(shared_data, tmp_path):
    scifact = shared_data / "scifact"
    args = [
        "eval",
        "beir",
        "--corpus",
        str(scifact / "corpus.jsonl"),
        "--queries",
        str(scifact / "queries.jsonl"),
    ]
    args += ["--qrels", str(scifact / "qrels" / "train.tsv"), "--store", str(tmp_path / "store")]
    args += [
        "--retriever",
        "bm25",
        "--splitter",
        "none",
        "--stopwords",
        "none",
        "--stemmer",
        "none",
        "--json",
        "-",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["queries"] == 809
    # measured with bm25s Lucene k1=1.2 b=0.75 and a plain analyzer: 0.668 (published BM25 anchors 0.665-0.69)
    assert out["ndcg@10"] == pytest.approx(0.668, abs=0.005)
    assert out["recall@100"] > 0.9
