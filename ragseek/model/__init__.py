"""ragseek's model: one DeepSeek-style Transformer (MHA/GQA/MQA/MLA x dense/MoE x MTP), its tokenizer and sampler,
loaded from and saved to transformers folders and GGUF files.

    config.py       ModelConfig, read from / written to a transformers config.json (llama, qwen2, deepseek_v3)
    layers.py       RMSNorm, the SwiGLU MLP, rotary embeddings (YaRN)
    attention.py    MHA / GQA / MQA and MLA (naive and absorbed paths), their KV caches (int8 option)
    moe.py          DeepSeekMoE: fine-grained and shared experts, group-limited routing, aux-loss-free balancing
    transformer.py  the Transformer: blocks, head, MTP modules, the training loss
    generate.py     batched generation with a KV cache: sampling, stop strings, logprobs, streaming
    tokenizer.py    a `tokenizers` BPE with its special tokens and chat template
    checkpoint.py   from_pretrained / save_pretrained: safetensors folders and GGUF
    gguf.py         llama.cpp GGUF files (dequantised) read as a transformers checkpoint
    lora.py         LoRA adapters on any linear layer, merged or not, in PEFT's format
    quant.py        weight-only int8 linears for CPU inference
"""

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
