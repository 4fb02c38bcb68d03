"""`ragseek serve --store`: the page at / and the routes it uses. POST /v1/ask gives `ragseek ask --json`'s object
(streamed: the pieces `ask` streams, then that object); GET /v1/documents the stored text the citations' offsets
index; POST /v1/documents ingests an upload, with progress. Bad input is a clear 4xx and the server keeps
answering. Then the page itself, in headless Chromium, against `ragseek serve` as its own process.

The model is tiny and random, so its answers are noise: `--attribute-min -1` cites every sentence's most similar
source, which makes each answer carry a citation whose span can be checked."""

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from chromium import missing, start_chromium
from test_server import KEY, post, wait_for
from typer.testing import CliRunner

from ragseek.cli import app
from ragseek.llm.cli import ServeConfig
from ragseek.llm.local import LocalLLM
from ragseek.llm.page import Library
from ragseek.llm.server import create_app
from ragseek.rag.pipeline import DONT_KNOW, SHORT_ANSWER, AskConfig, StepsConfig, ask
from ragseek.rag.query import transform
from ragseek.rag.search import SearchConfig, Searcher
from ragseek.rag.splitters import SplitterConfig
from ragseek.rag.store import Store, StoreConfig

QUESTION = "How many experts does DeepSeekMoE route each token to?"
# no word of it is in the store: the don't-know gate answers
UNKNOWN = "zebra xylophone quartz"
ROPE = "Rotary embeddings rotate query and key pairs by an angle"
FILLER = "".join(
    f"Routing note {i}: the router keeps one bias per expert and adds it to the score.\n\n" for i in range(40)
)
DOCS = {
    "mla.md": "# MLA\n\nMulti-head latent attention caches one latent vector per token.\n\n"
    "The absorbed path folds W_UK into the query, so the cache holds 576 numbers per token.",
    "moe.md": f"# MoE\n\n{FILLER}DeepSeekMoE routes each token to 8 of 256 experts. Café, naïve, 東京 stay intact.",
    "rope.md": "# RoPE\n\nRotary embeddings rotate query and key pairs by an angle proportional to position.",
    # two BEIR files that both hold an _id "1": two documents, told apart by their source
    "a.jsonl": json.dumps({"_id": "1", "title": "File a", "text": "Row one of file a."}) + "\n",
    "b.jsonl": json.dumps({"_id": "1", "title": "File b", "text": "Row one of file b."}) + "\n",
}
ASK_FLAGS = ("--embedder", "word2vec", "--attribute-min", "-1")


def make_store(root: Path, store: str | Path | None = None) -> str | Path:
    """DOCS in root/docs, ingested into `store` (a folder or a postgresql:// URL; default root/store)."""
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    store = store or root / "store"
    report = Store(store).ingest(
        [docs], SplitterConfig("recursive", 120, 0), StoreConfig(embedder="word2vec")
    )
    assert report.stored == len(DOCS) and not report.failed
    return store


def library(store: str | Path, **ask_settings) -> Library:
    """What `ragseek serve --store STORE` + ASK_FLAGS serves."""
    return Library(
        store,
        AskConfig(attribute_min=-1, **ask_settings),
        StepsConfig(),
        SearchConfig(k=3, embedder="word2vec"),
    )


@pytest.fixture(scope="module")
def page_llm(make_tiny_llm):
    # the prompt holds 3 sources: more than tiny_dir's 256 positions
    return LocalLLM.from_path(make_tiny_llm("tiny-page", max_seq_len=4096))


@pytest.fixture(scope="module")
def model_dir(page_llm):
    return page_llm.name.removeprefix("local:")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("page"))


@pytest.fixture(scope="module")
def page_url(start_server, page_llm, store_dir):
    return start_server(create_app(page_llm, ServeConfig(), library(store_dir))).removesuffix("/v1")


def events(url: str, data: bytes, headers: dict | None = None) -> list[dict]:
    """The `data:` events of a streamed answer, up to [DONE] (which must end it)."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    lines = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert lines[-1] == "[DONE]"
    return [json.loads(e) for e in lines[:-1]]


def asked(url: str, body: dict) -> list[dict]:
    return events(
        url + "/v1/ask", json.dumps({**body, "stream": True}).encode(), {"Content-Type": "application/json"}
    )


def upload(url: str, name: str, data: bytes, stream: bool = False, headers: dict | None = None):
    """(status, parsed JSON) of POST /v1/documents, or the events when streamed."""
    query = urllib.parse.urlencode({"name": name, "stream": str(stream).lower()})
    if stream:
        return events(f"{url}/v1/documents?{query}", data, headers)
    return post(f"{url}/v1/documents?{query}", None, headers, data=data)[:2]


def without_timings(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k != "timings"}


def test_ask_answers_with_ragseek_ask_json(page_url, store_dir, model_dir):
    status, served, _ = post(page_url + "/v1/ask", {"question": QUESTION})
    res = CliRunner().invoke(
        app,
        ["ask", QUESTION, "--store", str(store_dir), "--llm", f"local:{model_dir}", "--json", *ASK_FLAGS],
    )
    assert status == 200 and res.exit_code == 0, res.output
    cli = json.loads(res.stdout)
    assert without_timings(served) == without_timings(cli) and set(served["timings"]) == set(cli["timings"])
    assert served["citations"], "--attribute-min -1 cites every sentence"
    store = Store(store_dir)
    for c in served["citations"]:
        assert c["text"] == store.document(c["doc"]).text[c["start"] : c["end"]]


def test_ask_streams_the_pieces_then_the_answer(start_server, page_url, page_llm, store_dir):
    searcher = Searcher(Store(store_dir), SearchConfig(k=3, embedder="word2vec"))
    # by default an answer is held until `ask` has checked it, or until it is too long to check (SHORT_ANSWER)
    pieces: list[str] = []
    direct = ask(QUESTION, searcher, page_llm, AskConfig(attribute_min=-1), StepsConfig(), pieces.append)
    *streamed, last = asked(page_url, {"question": QUESTION})
    assert [e["text"] for e in streamed] == pieces
    assert len(pieces[0]) >= min(SHORT_ANSWER, len("".join(pieces)))
    assert without_timings(last["answer"]) == without_timings(direct.as_json())
    # unchecked, it streams as the model writes it
    unchecked = start_server(create_app(page_llm, ServeConfig(), library(store_dir, check_answer=False)))
    pieces = []
    direct = ask(
        QUESTION,
        searcher,
        page_llm,
        AskConfig(attribute_min=-1, check_answer=False),
        StepsConfig(),
        pieces.append,
    )
    *streamed, last = asked(unchecked.removesuffix("/v1"), {"question": QUESTION})
    assert [e["text"] for e in streamed] == pieces and len(pieces) > 1
    assert without_timings(last["answer"]) == without_timings(direct.as_json())


def test_ask_takes_retriever_k_and_query_mode(page_url, page_llm, store_dir):
    status, out, _ = post(page_url + "/v1/ask", {"question": ROPE, "retriever": "bm25", "k": 1})
    searcher = Searcher(Store(store_dir), SearchConfig(retriever="bm25", k=1, embedder="word2vec"))
    assert status == 200 and [c["chunk_id"] for c in out["chunks"]] == [
        h.chunk_id for h in searcher.search(ROPE)
    ]
    status, out, _ = post(page_url + "/v1/ask", {"question": QUESTION, "query": "rewrite"})
    assert status == 200 and out["queries"] == transform([QUESTION], "rewrite", page_llm)[0]
    # and the page shows the defaults it asks with
    status, settings, _ = post(page_url + "/v1/ask/settings", None, method="GET")
    assert status == 200 and settings["defaults"] == {"retriever": "hybrid", "k": 3, "query": "naive"}
    assert settings["choices"]["query"] == ["naive", "rewrite", "multi", "hyde"]
    chunks = Store(store_dir).info()["chunks"]
    assert settings["store"] == {"path": str(store_dir.resolve()), "documents": len(DOCS), "chunks": chunks}
    assert settings["dont_know"] == DONT_KNOW


def test_dont_know_is_an_answer(page_url):
    status, out, _ = post(page_url + "/v1/ask", {"question": UNKNOWN})
    assert status == 200 and out["answer"] == DONT_KNOW and out["citations"] == out["chunks"] == []
    *streamed, last = asked(page_url, {"question": UNKNOWN})
    assert [e["text"] for e in streamed] == [DONT_KNOW] and last["answer"]["answer"] == DONT_KNOW


def test_documents_give_the_text_the_offsets_index(page_url, store_dir):
    store = Store(store_dir)
    table = store.chunks()
    i = table.doc_ids.index(str((store_dir.parent / "docs" / "moe.md").resolve()), 0) + 5
    text = store.document(table.doc_ids[i]).text
    status, doc, _ = post(f"{page_url}/v1/documents?chunk_id={table.ids[i]}", None, method="GET")
    assert status == 200 and doc["text"] == text and (doc["offset"], doc["chars"]) == (0, len(text))
    assert doc["text"][table.starts[i] : table.ends[i]] == table.texts[i] and doc["title"] == "moe"
    status, doc, _ = post(
        f"{page_url}/v1/documents?chunk_id={table.ids[i]}&start=100&end=180", None, method="GET"
    )
    assert status == 200 and doc["text"] == text[100:180] and doc["offset"] == 100
    # a document is (source, doc_id): an _id two files hold needs its source
    status, err, _ = post(f"{page_url}/v1/documents?doc_id=1", None, method="GET")
    assert status == 409 and "names a document in several sources" in err["error"]["message"]
    source = str((store_dir.parent / "docs" / "b.jsonl").resolve())
    query = urllib.parse.urlencode({"doc_id": "1", "source": source})
    status, doc, _ = post(f"{page_url}/v1/documents?{query}", None, method="GET")
    assert status == 200 and doc["title"] == "File b" and doc["text"] == "File b\n\nRow one of file b."
    for query, code in [
        ("chunk_id=99999", 404),
        ("doc_id=nothing", 404),
        ("", 400),
        ("chunk_id=1&start=-1", 400),
    ]:
        status, err, _ = post(f"{page_url}/v1/documents?{query}", None, method="GET")
        assert status == code and err["error"]["message"], query


def test_bad_questions_are_400_and_the_server_goes_on(page_url):
    for body, message in [
        ({"question": " \n "}, "question: it is empty: type a question"),
        (
            {"question": "word " * 25_000},
            "question: 125,000 characters exceed this server's limit of 100,000 per request "
            "(ragseek serve --max-prompt-chars); shorten the prompt",
        ),
        ({"question": QUESTION, "k": 0}, "invalid request: k: Input should be greater than or equal to 1"),
        ({"question": QUESTION, "retriever": "grep"}, "invalid request: retriever: Input should be 'dense'"),
        (
            {"question": QUESTION, "retriever": "bm25", "query": "hyde"},
            "--query hyde retrieves by an embedding: use a dense, hybrid, svm or mmr retriever",
        ),
    ]:
        status, err, _ = post(page_url + "/v1/ask", body)
        assert status == 400 and err["error"]["message"].startswith(message), err
    # streamed, a failure after the answer began is an error event
    (event,) = asked(page_url, {"question": QUESTION, "retriever": "bm25", "query": "hyde"})
    assert event["error"]["message"].startswith("--query hyde retrieves by an embedding")
    assert post(page_url + "/v1/ask", {"question": QUESTION})[0] == 200


def test_an_upload_is_ingested_with_progress(start_server, page_llm, tmp_path, store_at):
    """On either store: a PostgreSQL store keeps uploads in its local cache folder (`Store.root`)."""
    store_dir = make_store(tmp_path, store_at("page"))
    url = start_server(create_app(page_llm, ServeConfig(max_body_bytes=4096), library(store_dir)))
    url = url.removesuffix("/v1")
    store = post(url + "/v1/ask/settings", None, method="GET")[1]["store"]
    assert (store["path"], store["documents"]) == (Store(store_dir).location, len(DOCS))
    note = b"# Notes\n\nThe upload test says that the sky over Quartzville is green.\n"
    *progress, last = upload(url, "../../my notes.md", note, stream=True)
    uploads = Store(store_dir).root / "uploads"
    path = uploads / "my_notes.md"
    assert [p["progress"]["stage"] for p in progress][0] == "documents" and progress[-1]["progress"][
        "done"
    ] > 0
    assert last["report"]["path"] == str(path) and last["report"]["stored"] == 1 and path.read_bytes() == note
    status, out, _ = post(
        url + "/v1/ask", {"question": "the sky over Quartzville is green", "retriever": "bm25", "k": 1}
    )
    assert status == 200 and out["chunks"][0]["doc_id"] == str(path.resolve())
    status, doc, _ = post(f"{url}/v1/documents?chunk_id={out['chunks'][0]['chunk_id']}", None, method="GET")
    assert doc["text"] == Store(store_dir).document(str(path.resolve())).text
    # again, unchanged: skipped
    status, report = upload(url, "my notes.md", note)
    assert status == 200 and (report["stored"], report["skipped"]) == (0, 1)

    documents = Store(store_dir).info()["documents"]
    for name, data, code, message in [
        ("photo.png", b"\x89PNG\r\n", 400, "'photo.png' is not a document ragseek reads: upload a .txt, .md"),
        (
            "blob.txt",
            b"\x00\x01binary",
            400,
            "blob.txt: binary file (NUL bytes): not a text document: nothing was added",
        ),
        ("empty.md", b"", 400, "empty.md: the file is empty: nothing to add"),
        (
            "big.md",
            b"x" * 5000,
            413,
            "the request body (5,000 bytes) exceeds this server's limit of 4,096 bytes",
        ),
    ]:
        status, err = upload(url, name, data)
        assert status == code and err["error"]["message"].startswith(message), err
    *_, event = upload(url, "blob.txt", b"\x00\x01binary", stream=True)
    assert event["error"]["message"].startswith("blob.txt: binary file")
    # nothing of them was kept, and the server goes on
    assert sorted(p.name for p in uploads.iterdir()) == ["my_notes.md"]
    assert Store(store_dir).info()["documents"] == documents
    assert post(url + "/v1/ask", {"question": QUESTION})[0] == 200


def test_the_key_guards_every_route_but_the_page_files(start_server, page_llm, store_dir):
    url = start_server(create_app(page_llm, ServeConfig(api_key=KEY), library(store_dir))).removesuffix("/v1")
    for path in ("/", "/static/page.js", "/static/page.css"):
        with urllib.request.urlopen(url + path, timeout=30) as resp:
            assert resp.status == 200, path
    assert post(url + "/v1/ask/settings", None, method="GET")[0] == 401
    assert post(url + "/v1/ask", {"question": QUESTION})[0] == 401
    assert upload(url, "notes.md", b"# Notes\n\nhello\n")[0] == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    assert post(url + "/v1/ask", {"question": QUESTION}, auth)[0] == 200
    assert post(url + "/v1/ask", {"question": QUESTION}, {"Authorization": "Bearer sk-wrong"})[0] == 401


def test_without_a_store_there_is_no_page(server_url):
    url = server_url.removesuffix("/v1")
    for path, body in [("/", None), ("/v1/ask", {"question": QUESTION})]:
        status, err, _ = post(url + path, body, method="GET" if body is None else "POST")
        assert status == 404 and err["error"]["message"].startswith("this server has no page: start it with")


def test_a_client_that_leaves_mid_answer_stops_it(start_server, page_llm, store_dir):
    lib = library(store_dir, max_tokens=400, one_paragraph=False)
    created = create_app(page_llm, ServeConfig(), lib)
    url, gate = start_server(created), created.state.gate
    # 400 tokens take over 4 s so; once the client hangs up, at most a forward pass or two more run
    forwards = []
    slow = page_llm.model.register_forward_pre_hook(lambda *_: forwards.append(time.sleep(0.01)))
    try:
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        body = json.dumps({"question": QUESTION, "stream": True})
        conn.request("POST", "/v1/ask", body, {"Content-Type": "application/json"})
        wait_for(lambda: len(forwards) >= 5)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_for(lambda: gate.admitted == 0)
        assert len(forwards) < 100, f"{len(forwards)} forward passes: the answer ran on after its client left"
    finally:
        slow.remove()


# --- the page in a browser -------------------------------------------------------------------------------------


def test_the_page_in_chromium(serve_process, model_dir, tmp_path):
    """Type a question, wait for the streamed answer, open a citation: the highlighted text is document.text[start:end]
    of that citation. Then don't-know, bad input (empty, a huge paste, a file that is no document), an upload,
    the keyboard and a narrow screen; the server stays up throughout."""
    if reason := missing():
        pytest.skip(reason)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    store_dir = make_store(tmp_path)
    api, proc = serve_process("--store", str(store_dir), *ASK_FLAGS, model=model_dir)
    status, expected, _ = post(api + "/ask", {"question": QUESTION})
    assert status == 200 and expected["citations"]
    driver = start_chromium(1280, 900)
    find = lambda id_: driver.find_element(By.ID, id_)  # noqa: E731
    wait = lambda ok: WebDriverWait(driver, 60).until(lambda _: ok())  # noqa: E731
    try:
        driver.get(api.removesuffix("/v1") + "/")
        wait(lambda: f"{len(DOCS)} documents" in find("about").text)
        assert (
            find("retriever-default").get_attribute("textContent") == "(default: hybrid)"
            and find("k").get_attribute("value") == "3"
        )
        question = find("question")

        find("ask").click()
        wait(lambda: find("message").text == "Type a question first.")
        driver.execute_script("arguments[0].value = arguments[1]", question, "word " * 25_000)
        find("ask").click()
        wait(lambda: "(ragseek serve --max-prompt-chars)" in find("message").text)

        # every change to the answer while it streams, then the final rendering
        driver.execute_script(
            "window.changes = 0; new MutationObserver(() => window.changes++)"
            ".observe(arguments[0], {childList: true, characterData: true, subtree: true})",
            find("answer"),
        )
        question.clear()
        question.send_keys(QUESTION, Keys.ENTER)
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#answer button.cite"))
        assert (
            find("answer").get_attribute("textContent") == expected["answer"] and find("message").text == ""
        )
        assert driver.execute_script("return window.changes") > 2, "the answer arrived in one piece"
        assert [
            r.text.split()[0] for r in driver.find_elements(By.CSS_SELECTOR, "#timings tbody tr")
        ] == list(expected["timings"])

        cited = expected["citations"][0]
        button = driver.find_element(By.CSS_SELECTOR, f'#answer button.cite[data-n="{cited["n"]}"]')
        button.click()
        wait(lambda: driver.find_elements(By.ID, "highlight"))
        mark = find("highlight")
        text = Store(store_dir).document(cited["doc"]).text
        assert mark.get_attribute("textContent") == text[cited["start"] : cited["end"]]
        assert (mark.get_attribute("data-start"), mark.get_attribute("data-end")) == tuple(
            str(cited[k]) for k in ("start", "end")
        )
        assert find("doc-path").text == cited["doc"]
        in_view = (
            "const m = arguments[0].getBoundingClientRect(), box = arguments[1].getBoundingClientRect();"
            "return m.top >= box.top && m.top < box.bottom && m.top >= 0 && m.top < innerHeight"
        )
        wait(lambda: driver.execute_script(in_view, mark, find("doc-text")))

        # the keyboard: Escape closes the document and gives the focus back; Enter opens it again
        question.send_keys(Keys.ESCAPE)
        wait(lambda: not find("viewer").is_displayed())
        assert driver.switch_to.active_element == button
        button.send_keys(Keys.ENTER)
        wait(lambda: find("viewer").is_displayed())

        # a narrow screen: one column, nothing wider than it
        driver.set_window_size(390, 844)
        narrow = "const e = document.documentElement; return e.scrollWidth <= e.clientWidth"
        wait(lambda: driver.execute_script(narrow))
        assert find("viewer").rect["y"] > find("answer").rect["y"]

        question.clear()
        question.send_keys(UNKNOWN, Keys.ENTER)
        wait(lambda: "dont-know" in find("answer").get_attribute("class"))
        assert find("answer").text == DONT_KNOW and "don't-know gate" in find("dont-know-why").text

        photo = tmp_path / "photo.png"
        photo.write_bytes(b"\x89PNG\r\n")
        find("file").send_keys(str(photo))
        find("upload").click()
        wait(lambda: "'photo.png' is not a document ragseek reads" in find("upload-message").text)
        note = tmp_path / "notes.md"
        note.write_text("# Notes\n\nThe sky over Quartzville is green.\n")
        find("file").send_keys(str(note))
        find("upload").click()
        wait(lambda: find("upload-message").text.startswith("Added notes.md: 1 chunks"))
        wait(lambda: f"{len(DOCS) + 1} documents" in find("about").text)
    finally:
        driver.quit()
    assert proc.poll() is None and post(api + "/models", None, method="GET")[0] == 200


def test_the_page_asks_for_the_key(start_server, page_llm, store_dir):
    """A server with a key: the page loads, says a key is needed, takes it, and answers with it."""
    if reason := missing():
        pytest.skip(reason)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url = start_server(create_app(page_llm, ServeConfig(api_key=KEY), library(store_dir))).removesuffix("/v1")
    driver = start_chromium(1024, 768)
    find = lambda id_: driver.find_element(By.ID, id_)  # noqa: E731
    wait = lambda ok: WebDriverWait(driver, 60).until(lambda _: ok())  # noqa: E731
    try:
        driver.get(url + "/")
        wait(lambda: find("message").text.startswith("missing API key"))
        assert find("key-field").is_displayed() and driver.switch_to.active_element == find("api-key")
        find("api-key").send_keys("sk-wrong", Keys.TAB)
        wait(lambda: find("message").text.startswith("incorrect API key"))
        find("api-key").clear()
        find("api-key").send_keys(KEY, Keys.TAB)
        wait(lambda: f"{len(DOCS)} documents" in find("about").text)
        assert find("message").text == ""
        find("question").send_keys(QUESTION, Keys.ENTER)
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#answer button.cite"))
    finally:
        driver.quit()
