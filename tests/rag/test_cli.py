"""The CLI end to end on real files: ingest / info / search / eval beir, with their --json outputs."""

import json
from pathlib import Path

from typer.testing import CliRunner

from ragseek.cli import app

DATA = Path(__file__).parent / "data"
runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_ingest_info_search_json(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text(
        "# Foxes\n\nThe quick brown fox jumps over the lazy dog.\n\nFoxes are wild canines."
    )
    (docs / "b.html").write_text("<p>Rivers flow past the old mill.</p><script>var fox = 1;</script>")
    (docs / "empty.txt").write_text("")
    store = str(tmp_path / "store")
    out = json.loads(
        invoke(
            "ingest", str(docs), str(DATA / "page.pdf"), "--store", store, "--embedder", "none", "--json"
        ).stdout
    )
    assert set(out) >= {"stored", "skipped", "failed", "chunks", "seconds"}
    assert (out["stored"], out["skipped"]) == (3, 0)
    assert out["failed"] == [{"path": str(docs / "empty.txt"), "reason": "empty file"}]
    again = json.loads(invoke("ingest", str(docs), "--store", store, "--embedder", "none", "--json").stdout)
    assert (again["stored"], again["skipped"], again["chunks"]) == (0, 2, 0)

    info = json.loads(invoke("info", "--store", store, "--json").stdout)
    assert (info["documents"], info["chunks"]) == (3, 3)

    hits = json.loads(
        invoke("search", "fox canines", "--store", store, "--retriever", "bm25", "--k", "2", "--json").stdout
    )
    assert hits[0]["doc_id"].endswith("a.md") and len(hits) <= 2
    assert (
        hits[0]["text"]
        == "# Foxes\n\nThe quick brown fox jumps over the lazy dog.\n\nFoxes are wild canines."
    )
    assert {"doc_id", "start", "end", "score", "text"} <= set(hits[0])
    assert "fox" not in json.dumps(
        [h for h in hits if h["doc_id"].endswith("b.html")]
    )  # the script was dropped


def test_eval_beir_json(tmp_path):
    beir = DATA / "beir"
    args = ["eval", "beir", "--corpus", str(beir / "corpus.jsonl"), "--queries", str(beir / "queries.jsonl")]
    args += ["--qrels", str(beir / "qrels.tsv"), "--store", str(tmp_path / "s"), "--retriever", "bm25"]
    out = json.loads(invoke(*args, "--json", "-").stdout)
    assert {"ndcg@10", "recall@10", "recall@100", "mrr@10", "qps"} <= set(out)
    assert out["queries"] == 3  # q4 is not judged
    assert out["recall@10"] == 1.0 and out["mrr@10"] == 1.0  # every query finds its document first
    invoke(*args, "--json", str(tmp_path / "m.json"))
    assert json.loads((tmp_path / "m.json").read_text())["ndcg@10"] == out["ndcg@10"]


def test_search_without_vectors_says_what_to_run(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("some text")
    invoke("ingest", str(docs), "--store", str(tmp_path / "s"), "--embedder", "none")
    result = runner.invoke(app, ["search", "text", "--store", str(tmp_path / "s"), "--retriever", "dense"])
    assert result.exit_code == 1
    assert "no 'minilm' embedding" in result.output and "ragseek ingest" in result.output
