"""ragseek's model: one DeepSeek-style Transformer (MHA/GQA/MQA/MLA x dense/MoE x MTP), its tokenizer and sampler."""

from ragseek.model.config import ModelConfig
from ragseek.model.generate import Generation, SamplingConfig, generate, stream
from ragseek.model.tokenizer import Tokenizer, load_tokenizer
from ragseek.model.transformer import Transformer

__all__ = [
    "ModelConfig",
    "Transformer",
    "Tokenizer",
    "load_tokenizer",
    "generate",
    "stream",
    "Generation",
    "SamplingConfig",
]
