"""Fixtures: a tiny random model with the SmolLM2 tokenizer, which both the local (ragseek) and the hf (transformers)
backends load, and real uvicorn servers on 127.0.0.1."""

import socket
import threading
import time

import pytest
import torch

from ragseek.defaults import smollm2_gguf
from ragseek.llm.local import LocalLLM
from ragseek.llm.server import create_app


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random ragseek model saved in the llama layout (so transformers' LlamaForCausalLM loads it too):
    dim 32, 2 layers, GQA, vocab 49152, with the SmolLM2 tokenizer files beside it."""
    from ragseek.model.config import ModelConfig
    from ragseek.model.tokenizer import load_tokenizer
    from ragseek.model.transformer import Transformer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = load_tokenizer(smollm2_gguf())
    tok.save(folder)
    torch.manual_seed(0)
    cfg = ModelConfig(
        model_type="llama", vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
        inter_dim=64, max_seq_len=256, init_std=0.5, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
    )  # fmt: skip
    Transformer(cfg).save_pretrained(folder)
    return folder


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
