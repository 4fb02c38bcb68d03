"""Fixtures: a tiny random Llama (transformers) with the SmolLM2 tokenizer, loaded by both local backends, and a
real uvicorn server on 127.0.0.1 serving the local one."""

import socket
import threading
import time

import pytest
import torch

from ragseek.defaults import smollm2_gguf
from ragseek.llm.hf import HFLLM
from ragseek.llm.local import LocalLLM
from ragseek.llm.server import create_app


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """config.json + model.safetensors (LlamaForCausalLM, dim 32, vocab 49152) + the SmolLM2 tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ragseek.model.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = load_tokenizer(smollm2_gguf())
    tok.save(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True,
        initializer_range=0.5, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def local_llm(tiny_dir):
    return LocalLLM.from_path(tiny_dir)


@pytest.fixture(scope="session")
def hf_llm(tiny_dir):
    return HFLLM.from_path(tiny_dir)


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
