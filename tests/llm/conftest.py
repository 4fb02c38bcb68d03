"""Fixtures: a tiny random model with the SmolLM2 tokenizer, which both the local (ragseek) and the hf (transformers)
backends load, and real uvicorn servers on 127.0.0.1."""

import socket
import threading
import time

import pytest

from ragseek.llm.local import LocalLLM
from ragseek.llm.server import create_app


@pytest.fixture(scope="session")
def tiny_dir(make_tiny_llm):
    return make_tiny_llm("tiny-llama", max_seq_len=256)


@pytest.fixture(scope="session")
def local_llm(tiny_dir):
    return LocalLLM.from_path(tiny_dir)


def _serve(llm, name):
    """Start `create_app(llm, name)` under uvicorn on a free 127.0.0.1 port; returns (base_url, stop)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(llm, name), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join()

    return f"http://127.0.0.1:{port}/v1", stop


@pytest.fixture(scope="session")
def start_server():
    """start_server(llm, name) -> base URL of a live server; all are stopped at the end of the session."""
    stops = []

    def start(llm, name):
        url, stop = _serve(llm, name)
        stops.append(stop)
        return url

    yield start
    for stop in stops:
        stop()


@pytest.fixture(scope="session")
def server_url(start_server, local_llm):
    return start_server(local_llm, "tiny")
