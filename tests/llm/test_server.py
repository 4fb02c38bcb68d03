"""The openai backend (the official client) against `ragseek serve`'s app on 127.0.0.1 serving the local backend:
every answer must equal what the local backend gives directly. Then the server under abuse: bodies and prompts
over the limits, clients that hang up, a full queue, API keys, and 200 clients at once against `ragseek serve` as its
own process."""

import collections
import http.client
import json
import re
import select
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from ragseek.llm.cli import ServeConfig
from ragseek.llm.local import LocalLLM
from ragseek.llm.openai_backend import OpenAILLM
from ragseek.llm.server import create_app

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHAT2 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(server_url):
    return OpenAILLM("tiny", base_url=server_url)


def post(url, body, headers=None, method="POST", data=None):
    """(status, parsed JSON or raw text, headers) of a request with a JSON body (None: no body), or with the bytes
    `data` as its body."""
    kind = "application/json" if data is None else "application/octet-stream"
    data = data if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": kind, **(headers or {})}, method=method
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, raw, head = resp.status, resp.read().decode(), resp.headers
    except urllib.error.HTTPError as err:
        status, raw, head = err.code, err.read().decode(), err.headers
    return status, json.loads(raw) if head["content-type"].startswith("application/json") else raw, head


def test_chat_and_raw_completions_equal_the_local_backend(client, local_llm):
    prompts = [CHAT, "The capital of France is", CHAT2, "a b c"]
    assert client.complete(prompts, max_tokens=8) == local_llm.complete(prompts, max_tokens=8)
    full = local_llm.complete(["The answer"], max_tokens=12)[0]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert client.complete(["The answer"], max_tokens=12, stop=[stop]) == [full[: full.find(stop)]]


def test_streaming(client, local_llm, server_url):
    assert "".join(client.stream(CHAT, max_tokens=10)) == local_llm.complete([CHAT], max_tokens=10)[0]
    assert "".join(client.stream("a b c", max_tokens=10)) == local_llm.complete(["a b c"], max_tokens=10)[0]
    status, body, _ = post(
        server_url + "/chat/completions", {"model": "tiny", "messages": CHAT, "stream": True, "max_tokens": 3}
    )
    events = [line.removeprefix("data: ") for line in body.split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completions_logprobs_equal_the_local_backend(client, local_llm, server_url):
    prompts, conts = ["The capital of France is", "Answer:", "héllo"], [" Paris", " no", " wörld"]
    assert client.logprobs(prompts, conts) == pytest.approx(local_llm.logprobs(prompts, conts), abs=1e-4)
    (remote,), (local,) = (
        client.token_logprobs(["héllo wörld"], top=2),
        local_llm.token_logprobs(["héllo wörld"], top=2),
    )
    assert remote.tokens == local.tokens and remote.text_offset == local.text_offset
    assert remote.token_logprobs[0] is None and remote.token_logprobs[1:] == pytest.approx(
        local.token_logprobs[1:], abs=1e-4
    )
    assert remote.top_logprobs == local.top_logprobs
    # without echo: the generated tokens' logprobs, offsets counted from the start of the prompt
    status, body, _ = post(
        server_url + "/completions",
        {"model": "tiny", "prompt": "a b", "max_tokens": 3, "temperature": 0, "logprobs": 0},
    )
    choice = body["choices"][0]
    (scored,) = local_llm.token_logprobs(["a b" + choice["text"]])
    n = len(choice["logprobs"]["tokens"])
    assert (
        status == 200
        and "".join(choice["logprobs"]["tokens"]) == choice["text"]
        and choice["logprobs"]["text_offset"][0] == 3
    )
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(scored.token_logprobs[-n:], abs=1e-6)


def test_a_prompt_ending_inside_a_token_is_a_clear_error(client):
    with pytest.raises(ValueError, match="end the prompt on a token boundary"):
        client.logprobs(["Answer: y"], ["es"])  # the server sees " yes" as one token


def test_chat_scoring_is_not_implemented(client):
    with pytest.raises(NotImplementedError, match="local or hf:PATH"):
        client.logprobs([CHAT], ["yes"])


def test_a_server_without_prompt_logprobs(start_server, local_llm):
    class NoEcho(LocalLLM):
        def token_logprobs(self, texts, top=0):
            raise NotImplementedError("this backend keeps no logprobs")

    url = start_server(NoEcho(local_llm.model, local_llm.tokenizer), "noecho")
    with pytest.raises(NotImplementedError, match=r"501.*ragseek serve, vLLM"):
        OpenAILLM("noecho", base_url=url).logprobs(["Answer:"], [" yes"])


def test_bad_requests_are_400_with_a_clear_message(client, server_url):
    status, body, _ = post(server_url + "/chat/completions", {"model": "tiny"})
    assert status == 400 and body["error"]["message"] == "invalid request: messages: Field required"
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "messages"
    status, body, _ = post(server_url + "/completions", {"model": "tiny", "prompt": [1, 2, 3]})
    assert status == 400 and "token-id prompts are not supported" in body["error"]["message"]
    status, body, _ = post(
        server_url + "/completions", {"model": "tiny", "prompt": "x", "stream": True, "echo": True}
    )
    assert status == 400 and "stream=true takes one prompt" in body["error"]["message"]
    with pytest.raises(
        openai.BadRequestError, match="messages.0.role: Input should be 'system', 'user' or 'assistant'"
    ):
        client.client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.client.chat.completions.create(model="tiny", messages=CHAT, top_p=0.5)
    # the backend's own check, also when streaming
    with pytest.raises(openai.BadRequestError, match="max_seq_len"):
        client.complete(["word " * 300], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_seq_len"):
        list(client.stream([{"role": "user", "content": "word " * 300}], max_tokens=4))
    with pytest.raises(openai.NotFoundError, match="'gpt-4o' is not served here; this server serves 'tiny'"):
        OpenAILLM("gpt-4o", base_url=server_url).complete([CHAT], max_tokens=2)


def test_models_endpoint(server_url):
    with urllib.request.urlopen(server_url + "/models") as resp:
        body = json.loads(resp.read())
    assert [m["id"] for m in body["data"]] == ["tiny"]


# ---------------------------------------------------------------------------------------------------------------------
# under abuse (issue 14 §5): body and prompt limits, a client that leaves, a full queue, API keys, 200 clients at once

KEY = "sk-ragseek-test"


def oversized(url, size, chunked=False, headers=None):
    """(status, parsed JSON) of a POST of `size` bytes that no server should read whole: announced by Content-Length
    and never sent, or sent chunked (no length announced) in 64 KiB pieces until the server answers."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.putrequest("POST", parts.path)
    for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
        conn.putheader(k, v)
    if chunked:
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        piece = b"x" * 65536
        for _ in range(size // len(piece)):
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            if select.select([conn.sock], [], [], 0)[0]:
                break
    else:
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
    resp = conn.getresponse()
    status, body = resp.status, json.loads(resp.read())
    conn.close()
    return status, body


def test_a_body_over_the_limit_is_413_before_it_is_read(server_url):
    # the default limit is 1 MiB; 50 MB announced and not one byte sent: the headers alone get the answer
    status, body = oversized(server_url + "/completions", 50 << 20)
    assert status == 413 and body["error"]["message"] == (
        "the request body (52,428,800 bytes) exceeds this server's limit of 1,048,576 bytes "
        "(ragseek serve --max-body-bytes)"
    )
    assert body["error"]["type"] == "invalid_request_error"
    # no length announced: refused as soon as the limit is passed, the rest never read
    status, body = oversized(server_url + "/chat/completions", 50 << 20, chunked=True)
    assert status == 413 and "exceeds this server's limit of 1,048,576 bytes" in body["error"]["message"]


def test_a_prompt_over_the_limit_is_400_naming_the_limit(server_url):
    # the default limit is 100,000 characters per request (all prompts, all messages)
    status, body, _ = post(
        server_url + "/completions", {"model": "tiny", "prompt": ["word " * 12_000] * 2, "max_tokens": 1}
    )
    assert status == 400 and body["error"]["param"] == "prompt"
    assert body["error"]["message"] == (
        "prompt: 120,000 characters exceed this server's limit of 100,000 per request "
        "(ragseek serve --max-prompt-chars); shorten the prompt"
    )
    chat = [{"role": "system", "content": "x" * 60_000}, {"role": "user", "content": "y" * 60_000}]
    status, body, _ = post(
        server_url + "/chat/completions", {"model": "tiny", "messages": chat, "stream": True}
    )
    assert status == 400 and body["error"]["param"] == "messages"
    assert body["error"]["message"].startswith("messages: 120,000 characters exceed this server's limit")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_client_that_leaves_stops_its_generation(server_url, local_llm, stream):
    """200 tokens take ~4 s here; once the client hangs up, at most a forward pass or two more run."""
    forwards = []
    slow = local_llm.model.register_forward_pre_hook(lambda *_: forwards.append(time.sleep(0.01)))
    try:
        parts = urllib.parse.urlsplit(server_url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        body = {"model": "tiny", "prompt": "a b c", "max_tokens": 200, "temperature": 0, "stream": stream}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        wait_for(lambda: len(forwards) >= 5)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        left = len(forwards)
        # the generation has ended once no forward pass has run for a second
        last = -1
        while last != len(forwards):
            last = len(forwards)
            time.sleep(1)
        assert len(forwards) - left <= 3, f"{len(forwards) - left} forward passes after the client left"
    finally:
        slow.remove()


def wait_for(ok, timeout=30):
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_client_that_leaves_while_waiting_never_generates(start_server, local_llm):
    app = create_app(local_llm, ServeConfig(served_model_name="waiting"))
    url, gate = start_server(app), app.state.gate
    forwards, running, release = [], threading.Event(), threading.Event()

    def hold(*_):
        forwards.append(None)
        running.set()
        release.wait(30)

    # first in line, so it counts a forward pass that the server then stops
    handle = local_llm.model.register_forward_pre_hook(hold, prepend=True)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(
                post, url + "/completions", {"model": "waiting", "prompt": "a b", "max_tokens": 3}
            )
            running.wait(30)
            parts = urllib.parse.urlsplit(url)
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            body = {"model": "waiting", "prompt": "a b c", "max_tokens": 200}
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            wait_for(lambda: gate.admitted == 2)
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
            time.sleep(0.5)  # ample for the server's idle event loop to see the hang-up
            release.set()
            assert first.result()[0] == 200
        wait_for(lambda: gate.admitted == 0)
    finally:
        release.set()
        handle.remove()
    # the first request's 2 decoding steps (3 tokens: the prefill makes the first); none for the one that left
    assert len(forwards) == 2


def test_a_full_queue_answers_503_with_retry_after(start_server, local_llm):
    url = start_server(local_llm, "queued", queue_size=1)
    running, release = threading.Event(), threading.Event()

    def wait_for_release(*_):
        running.set()
        release.wait(30)

    hold = local_llm.model.register_forward_pre_hook(wait_for_release)
    ask = {"model": "queued", "prompt": "a b", "max_tokens": 2}
    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(post, url + "/completions", ask)
            running.wait(30)
            # one waits in the queue, the other finds it full (whichever comes second)
            later = [pool.submit(post, url + "/completions", ask) for _ in range(2)]
            wait_for(lambda: any(f.done() for f in later))
            release.set()
            (s1, *_), answers = first.result(), sorted((f.result() for f in later), key=lambda a: a[0])
    finally:
        release.set()
        hold.remove()
    assert s1 == 200 and [a[0] for a in answers] == [200, 503]
    _, busy, head = answers[1]
    assert int(head["Retry-After"]) >= 1 and busy["error"]["type"] == "server_error"
    assert busy["error"]["message"].startswith("the server is busy: 1 request generating and 1 waiting")


def test_an_api_key_is_required_when_set(start_server, local_llm):
    url = start_server(local_llm, "keyed", api_key=KEY)
    status, body, head = post(url + "/completions", {"model": "keyed", "prompt": "a", "max_tokens": 1})
    assert status == 401 and head["WWW-Authenticate"] == "Bearer"
    assert body["error"] == {
        "message": "missing API key: send the header 'Authorization: Bearer KEY' (the key this server was "
        "started with: ragseek serve --api-key, or $RAGSEEK_API_KEY)",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    status, body, _ = post(url + "/models", None, {"Authorization": "Bearer sk-wrong"}, method="GET")
    assert status == 401 and body["error"]["message"] == "incorrect API key"
    # refused from the headers: an unauthenticated client cannot make the server read a body
    status, body = oversized(url + "/completions", 50 << 20)
    assert status == 401
    assert OpenAILLM("keyed", base_url=url, api_key=KEY).complete(
        ["a b"], max_tokens=4
    ) == local_llm.complete(["a b"], max_tokens=4)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        OpenAILLM("keyed", base_url=url, api_key="sk-wrong").complete(["a b"], max_tokens=4)


def rss(pid):
    """Resident memory of a process, in bytes (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def test_200_concurrent_clients(serve_process):
    """`ragseek serve` as its own process, key from $RAGSEEK_API_KEY, 2 waiting at most: 200 clients at once, honest
    and not. Every answer is the designed one (no 5xx but the queue's 503), memory stays bounded, and it still
    answers afterwards."""
    url, proc = serve_process("--queue-size", "2", env={"RAGSEEK_API_KEY": KEY})
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}
    assert post(url + "/chat/completions", chat, auth)[0] == 200
    before = rss(proc.pid)

    clients = (
        [("chat", lambda: post(url + "/chat/completions", chat, auth))] * 120
        + [("stream", lambda: post(url + "/chat/completions", {**chat, "stream": True}, auth))] * 30
        + [("50 MB announced", lambda: oversized(url + "/completions", 50 << 20, headers=auth))] * 15
        + [("50 MB chunked", lambda: oversized(url + "/completions", 50 << 20, True, auth))] * 10
        + [("150k-char prompt", lambda: post(url + "/completions", {**chat, "prompt": "x" * 150_000}, auth))]
        * 15
        + [("no key", lambda: post(url + "/chat/completions", chat))] * 5
        + [("wrong key", lambda: post(url + "/chat/completions", chat, {"Authorization": "Bearer x"}))] * 5
    )
    designed = {
        "chat": {200, 503},
        "stream": {200, 503},
        "50 MB announced": {413},
        "50 MB chunked": {413},
        "150k-char prompt": {400},
        "no key": {401},
        "wrong key": {401},
    }
    start, peak, done = threading.Barrier(len(clients)), [before], threading.Event()

    def client(kind_call):
        kind, call = kind_call
        start.wait()
        return kind, call()[0]

    def watch():
        while not done.is_set():
            peak.append(rss(proc.pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(len(clients)) as pool:
        got = list(pool.map(client, clients))
    done.set()
    watcher.join()
    counts = collections.Counter(got)
    assert {(kind, s) for kind, s in counts if s not in designed[kind]} == set(), counts
    # the queue both serves and sheds (which of chat and stream gets the free places is a race)
    served, shed = (sum(counts[(kind, status)] for kind in ("chat", "stream")) for status in (200, 503))
    assert served > 0 and shed > 0, counts
    assert proc.poll() is None and post(url + "/chat/completions", chat, auth)[0] == 200
    assert max(peak) - before < 300 << 20, f"RSS {before >> 20} MB -> peak {max(peak) >> 20} MB"
