"""Fixtures: a tiny random model with the SmolLM2 tokenizer, which both the local (ragseek) and the hf (transformers)
backends load, and real uvicorn servers on 127.0.0.1 (in a thread of this process, or `ragseek serve` as its own
process)."""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from ragseek.llm.cli import ServeConfig
from ragseek.llm.local import LocalLLM
from ragseek.llm.server import create_app


@pytest.fixture(scope="session")
def tiny_dir(make_tiny_llm):
    return make_tiny_llm("tiny-llama", max_seq_len=256)


@pytest.fixture(scope="session")
def local_llm(tiny_dir):
    return LocalLLM.from_path(tiny_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(app):
    """Start `app` under uvicorn on a free 127.0.0.1 port; returns (base_url, stop)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
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
    """start_server(llm, name, **ServeConfig fields) -> base URL of a live server (or start_server(app) for an app
    already made); all are stopped at the end of the session."""
    stops = []

    def start(llm, name=None, **settings):
        app = llm if name is None else create_app(llm, ServeConfig(served_model_name=name, **settings))
        url, stop = _serve(app)
        stops.append(stop)
        return url

    yield start
    for stop in stops:
        stop()


@pytest.fixture(scope="session")
def server_url(start_server, local_llm):
    return start_server(local_llm, "tiny")


@pytest.fixture
def serve_process(tiny_dir, tmp_path):
    """serve_process(*flags, env={...}, model=FOLDER) -> (base URL, Popen): `ragseek serve --llm local:TINY` (or
    local:FOLDER) as its own process on a free 127.0.0.1 port, answering; killed after the test. Its log is
    tmp_path/serve.log."""
    procs = []

    def start(*flags, env=None, model=None):
        port = free_port()
        log = open(tmp_path / "serve.log", "wb")
        llm = f"local:{model or tiny_dir}"
        cmd = [sys.executable, "-m", "ragseek", "serve", "--llm", llm, "--port", str(port)]
        proc = subprocess.Popen(
            [*cmd, "--served-model-name", "tiny", *flags],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        procs.append((proc, log))
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return f"http://127.0.0.1:{port}/v1", proc
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"ragseek serve did not start:\n{(tmp_path / 'serve.log').read_text()}"
                    ) from None
                time.sleep(0.1)

    yield start
    for proc, log in procs:
        proc.kill()
        proc.wait()
        log.close()
