"""The openai backend (the official client) against `ragseek serve`'s app on 127.0.0.1 serving the local backend:
every answer must equal what the local backend gives directly."""

import json
import urllib.error
import urllib.request

import openai
import pytest

from ragseek.llm.local import LocalLLM
from ragseek.llm.openai_backend import OpenAILLM

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHAT2 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(server_url):
    return OpenAILLM("tiny", base_url=server_url)


def post(url, body):
    """(status, parsed JSON or raw text) of a POST with a JSON body."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req) as resp:
            status, raw, kind = resp.status, resp.read().decode(), resp.headers["content-type"]
    except urllib.error.HTTPError as err:
        status, raw, kind = err.code, err.read().decode(), err.headers["content-type"]
    return status, json.loads(raw) if kind.startswith("application/json") else raw


def test_chat_and_raw_completions_equal_the_local_backend(client, local_llm):
    prompts = [CHAT, "The capital of France is", CHAT2, "a b c"]
    assert client.complete(prompts, max_tokens=8) == local_llm.complete(prompts, max_tokens=8)
    full = local_llm.complete(["The answer"], max_tokens=12)[0]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert client.complete(["The answer"], max_tokens=12, stop=[stop]) == [full[: full.find(stop)]]


def test_streaming(client, local_llm, server_url):
    assert "".join(client.stream(CHAT, max_tokens=10)) == local_llm.complete([CHAT], max_tokens=10)[0]
    assert "".join(client.stream("a b c", max_tokens=10)) == local_llm.complete(["a b c"], max_tokens=10)[0]
    status, body = post(
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
    status, body = post(
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
    status, body = post(server_url + "/chat/completions", {"model": "tiny"})
    assert status == 400 and body["error"]["message"] == "invalid request: messages: Field required"
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "messages"
    status, body = post(server_url + "/completions", {"model": "tiny", "prompt": [1, 2, 3]})
    assert status == 400 and "token-id prompts are not supported" in body["error"]["message"]
    status, body = post(
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
