import os

import pytest
import torch

from ragseek.defaults import shared_data_dir, smollm2_gguf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def shared_data():
    """../shared/data (SciFact, GSM8K); tests that need it skip when the checkout has no shared/ beside it."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent (set RAGSEEK_DATA to a folder with scifact/ and gsm8k/)")
    return path


@pytest.fixture(scope="session")
def make_tiny_llm(tmp_path_factory):
    """make_tiny_llm(name, max_seq_len) -> a folder with a tiny random ragseek model saved in the llama layout (so
    transformers' LlamaForCausalLM loads it too): dim 32, 2 layers, GQA, vocab 49152, with the SmolLM2 tokenizer
    files beside it. Text quality is irrelevant; the code paths are the real ones."""
    from ragseek.model.config import ModelConfig
    from ragseek.model.tokenizer import load_tokenizer
    from ragseek.model.transformer import Transformer

    def make(name: str, max_seq_len: int):
        folder = tmp_path_factory.mktemp(name)
        tok = load_tokenizer(smollm2_gguf())
        tok.save(folder)
        torch.manual_seed(0)
        cfg = ModelConfig(
            model_type="llama", vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
            head_dim=8, inter_dim=64, max_seq_len=max_seq_len, init_std=0.5, bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
        )  # fmt: skip
        Transformer(cfg).save_pretrained(folder)
        return folder

    return make
