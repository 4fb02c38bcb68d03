"""`load_llm` spec parsing and its errors (the hf:PATH spec is in test_hf.py); `ragseek serve` as a real process."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from ragseek.llm import load_llm
from ragseek.llm.local import LocalLLM
from ragseek.llm.openai_backend import OpenAILLM


def test_local_spec(tiny_dir):
    local = load_llm(f"local:{tiny_dir}")
    assert isinstance(local, LocalLLM) and local.name == f"local:{tiny_dir}"


def test_openai_spec_base_url_and_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    llm = load_llm("openai:qwen2.5:7b", base_url="http://127.0.0.1:9/v1")  # the model name may hold a colon
    assert (
        isinstance(llm, OpenAILLM)
        and llm.model == "qwen2.5:7b"
        and str(llm.client.base_url) == "http://127.0.0.1:9/v1/"
    )
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:7/v1")
    assert str(load_llm("openai:m").client.base_url) == "http://127.0.0.1:7/v1/"
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(ValueError, match="set OPENAI_API_KEY"):
        load_llm("openai:gpt-4o-mini")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert load_llm("openai:gpt-4o-mini").client.api_key == "sk-test"


@pytest.mark.parametrize("spec", ["", "gpt-4o", "hf", "hf:", "openai", "openai:", "vllm:qwen", "Local"])
def test_bad_spec_says_what_is_accepted(spec):
    with pytest.raises(ValueError, match=r"use local, local:base, local:PATH, hf:PATH or openai:MODEL"):
        load_llm(spec)


def test_base_url_without_openai_is_an_error(tiny_dir):
    with pytest.raises(ValueError, match="--base-url applies to --llm openai:MODEL only"):
        load_llm(f"local:{tiny_dir}", base_url="http://127.0.0.1:8000/v1")


def test_serve_command_runs_a_server(tiny_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a Typer app with a callback keeps `serve` a subcommand, as in `ragseek serve`
    code = "import typer; from ragseek.llm.cli import register; app = typer.Typer(callback=lambda: None); register(app); app()"
    args = ["serve", "--llm", f"local:{tiny_dir}", "--port", str(port), "--served-model-name", "tiny-cli"]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as resp:
                    body = json.loads(resp.read())
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ragseek serve did not start:\n{log.read_text()}")
                time.sleep(0.2)
        assert [m["id"] for m in body["data"]] == ["tiny-cli"]
        answer = OpenAILLM("tiny-cli", base_url=f"http://127.0.0.1:{port}/v1").complete(
            ["a b c"], max_tokens=4
        )
        assert answer == LocalLLM.from_path(tiny_dir).complete(["a b c"], max_tokens=4)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
