"""The CLI end to end on real files: ingest / info / search / eval beir / eval qa, with their --json outputs."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragseek.cli import app
from ragseek.rag.evaluate import load_squad
from ragseek.rag.store import Store

DATA = Path(__file__).parent / "data"
runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_ingest_of_a_missing_path_names_it_and_stores_the_rest(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("Foxes are wild canines.")
    store = tmp_path / "store"
    args = [
        "ingest",
        str(tmp_path / "docs"),
        str(tmp_path / "my-papers"),
        "--store",
        str(store),
        "--embedder",
    ]
    result = runner.invoke(app, [*args, "none"])
    assert result.exit_code == 0 and "stored 1," in result.stdout
    assert f"failed: {tmp_path / 'my-papers'}: no such file or folder" in result.stderr
    # nothing to read at all: one error line, and no store is created
    result = runner.invoke(app, ["ingest", str(tmp_path / "my-papers"), "--store", str(tmp_path / "typo")])
    assert result.exit_code == 2 and "my-papers: no such file or folder" in result.output
    assert "nothing was ingested" in result.output and not (tmp_path / "typo").exists()


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
    # the script was dropped
    assert "fox" not in json.dumps([h for h in hits if h["doc_id"].endswith("b.html")])

    # the same options from a YAML file and --set; a flag given on the command line wins over both
    config = tmp_path / "search.yaml"
    config.write_text("retriever: bm25\nk: 2\n")
    search = ["search", "fox canines", "--store", store, "--json", "--config", str(config)]
    assert json.loads(invoke(*search).stdout) == hits and len(hits) == 2
    assert json.loads(invoke(*search, "--set", "k=1").stdout) == hits[:1]
    assert json.loads(invoke(*search, "--set", "k=1", "--k", "2").stdout) == hits
    for bad, says in (("--set", "kk=1"), ("--set", "k"), ("--config", str(tmp_path / "none.yaml"))):
        result = runner.invoke(app, [*search[:5], bad, says])
        assert result.exit_code == 2 and (
            "kk" in result.output or "key=value" in result.output or "none.yaml" in result.output
        ), result.output


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


def test_eval_beir_counts_and_warns_about_qrels_ids_not_in_the_corpus(tmp_path):
    beir = DATA / "beir"
    qrels = tmp_path / "qrels.tsv"
    # d1 and d3 are in the corpus; d77 and d99 are not (relevant, so they can only be misses), d98 judged 0
    qrels.write_text("q1\td1\t1\nq1\td99\t1\nq2\td3\t1\nq3\td77\t2\nq3\td98\t0\n")
    args = ["eval", "beir", "--corpus", str(beir / "corpus.jsonl"), "--queries", str(beir / "queries.jsonl")]
    args += ["--qrels", str(qrels), "--store", str(tmp_path / "s"), "--retriever", "bm25", "--json", "-"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["qrels_not_in_corpus"] == 2 and out["queries_without_documents"] == 1  # q3
    assert "warning: 2 of 4 relevant qrels documents are not in the corpus (first: 'd99')" in result.stderr


def test_search_without_vectors_says_what_to_run(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("some text")
    invoke("ingest", str(docs), "--store", str(tmp_path / "s"), "--embedder", "none")
    result = runner.invoke(app, ["search", "text", "--store", str(tmp_path / "s"), "--retriever", "dense"])
    assert result.exit_code == 2
    assert "no 'minilm' embedding" in result.output and "ragseek ingest" in result.output


SQUAD = DATA / "squad-slice.json"  # 4 paragraphs, 11 questions


@pytest.fixture
def tiny_llm(make_tiny_llm):
    return f"local:{make_tiny_llm('tiny-qa', max_seq_len=4096)}"


def tiny_qa_args(llm: str) -> list[str]:
    """`eval qa` on the committed slice with the tiny model, word2vec vectors and 4-token answers."""
    return ["eval", "qa", "--data", str(SQUAD), "--llm", llm, "--embedder", "word2vec", "--max-tokens", "4"]


def test_eval_qa_retrieved_with_dropped_gold(tmp_path, monkeypatch, tiny_llm):
    """eval qa end to end on the committed slice with a tiny random model: the store is built from --data (one
    document per paragraph, cached), gold paragraphs of about 30% of the questions are dropped from it, and every
    question gets a prediction line whose citations are exact spans of stored paragraphs."""
    monkeypatch.setenv("RAGSEEK_CACHE", str(tmp_path / "cache"))
    preds = tmp_path / "p.jsonl"
    args = tiny_qa_args(tiny_llm)
    args += [
        "--min-similarity",
        "-1",
        "--max-unanswerable",
        "1",
        "--attribute-min",
        "-1",
        "--drop-gold-frac",
        "0.3",
    ]
    out = json.loads(invoke(*args, "--json", "--predictions", str(preds)).stdout)
    assert {"em", "f1", "citation_accuracy", "dont_know_rate", "p50_s", "p95_s", "n"} <= set(out)
    assert {"dont_know_precision", "dont_know_recall"} <= set(out)
    items = load_squad(SQUAD)
    assert out["n"] == 11 and out["oracle"] is False and out["dropped"] >= 1
    assert 0.3 * 11 <= out["gold_missing"] < 11 and 0 <= out["f1"] <= 1 and out["p50_s"] <= out["p95_s"]
    # the gates are off (--min-similarity -1, --max-unanswerable 1), so nothing is a don't-know and its precision
    # is undefined
    assert (
        out["dont_know_rate"] == 0.0 and out["dont_know_precision"] is None and out["dont_know_recall"] == 0.0
    )
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["id"] for r in rows] == [it.id for it in items]
    st = Store(out["store"])
    assert st.info()["documents"] == 4 - out["dropped"]
    for r in rows:
        # attribution cites every sentence
        assert set(r) == {"id", "answer", "citations"} and r["citations"], r
        for c in r["citations"]:
            assert set(c) == {"doc", "start", "end", "text"}
            assert st.document(c["doc"]).text[c["start"] : c["end"]] == c["text"]


def test_eval_qa_oracle_reads_the_gold_paragraph(tmp_path, monkeypatch, tiny_llm):
    monkeypatch.setenv("RAGSEEK_CACHE", str(tmp_path / "cache"))
    preds = tmp_path / "p.jsonl"
    args = tiny_qa_args(tiny_llm)
    args += ["--oracle", "--n", "4", "--attribute-min", "-1", "--json", "--predictions", str(preds)]
    out = json.loads(invoke(*args).stdout)
    assert (out["n"], out["oracle"], out["gold_missing"]) == (4, True, 0)
    # the one source is the whole gold paragraph, which holds the answer: cited [1] means cited correctly
    assert out["citation_accuracy"] == 1.0
    items = load_squad(SQUAD)[:4]
    for it, line in zip(items, preds.read_text().splitlines(), strict=True):
        (c,) = json.loads(line)["citations"]
        assert (c["doc"], c["start"], c["text"]) == (it.doc_id, 0, it.context)


def test_eval_qa_rejects_a_file_that_is_not_squad(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGSEEK_CACHE", str(tmp_path / "cache"))
    bad = DATA / "beir" / "corpus.jsonl"
    result = runner.invoke(app, ["eval", "qa", "--data", str(bad)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert str(bad) in text and "is not SQuAD v1.1 format" in text and '"answer_start": int' in text


@pytest.mark.slow
def test_eval_qa_with_the_embedded_models(tmp_path, monkeypatch):
    """SmolLM2 + MiniLM (the defaults) on the slice's first 3 questions (all on Normans/0), retrieved mode."""
    monkeypatch.setenv("RAGSEEK_CACHE", str(tmp_path / "cache"))
    preds = tmp_path / "p.jsonl"
    out = json.loads(
        invoke("eval", "qa", "--data", str(SQUAD), "--n", "3", "--json", "--predictions", str(preds)).stdout
    )
    assert (out["n"], out["gold_missing"], out["llm"]) == (3, 0, "local") and 0 < out["p50_s"] <= out["p95_s"]
    assert 0 <= out["em"] <= out["f1"] + 1e-9 <= 1 + 1e-9
    st = Store(out["store"])
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 3 and all(r["answer"] for r in rows)
    for c in (c for r in rows for c in r["citations"]):
        assert st.document(c["doc"]).text[c["start"] : c["end"]] == c["text"]


def test_eval_qa_rejects_an_adapter_for_another_base_naming_the_file(tmp_path, monkeypatch, make_tiny_llm):
    """An adapter trained on one model, pointed at a base of other sizes: one line naming the adapter's file."""
    from ragseek.model import ModelConfig, Transformer
    from ragseek.model.lora import LoRAConfig, apply_lora, save_adapter

    monkeypatch.setenv("RAGSEEK_CACHE", str(tmp_path / "cache"))
    base = make_tiny_llm("tiny-base", max_seq_len=256)
    other = Transformer(ModelConfig(vocab_size=300, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8))
    adapter = save_adapter(apply_lora(other, LoRAConfig(r=2)), tmp_path / "adapter", base=base)
    result = runner.invoke(app, tiny_qa_args(f"local:{adapter}"))
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert str(adapter / "adapter_model.safetensors") in text and "Traceback" not in text


@pytest.mark.parametrize(
    "args, says",
    [
        (["search", "fox", "--k", "-1"], "--k -1"),
        (["search", "fox", "--k", "0"], "--k 0"),
        (["search", "fox", "--candidates", "0"], "--candidates 0"),
        (["search", "fox", "--dense-weight", "5"], "--dense-weight 5.0"),
        (["ask", "what do foxes eat?", "--k", "0"], "--k 0"),
        (["ingest", "DOCS", "--batch-size", "0"], "--batch-size 0"),
    ],
)
def test_out_of_range_flags_are_refused_naming_the_flag(tmp_path, args, says):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("Foxes are wild canines.")
    store = str(tmp_path / "store")
    invoke("ingest", str(docs), "--store", store, "--embedder", "none")
    args = [str(docs) if a == "DOCS" else a for a in args]
    result = runner.invoke(app, [*args, "--store", store])
    # a usage error (exit 2) that names the flag and its value, before any model loads or anything is stored
    assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output
