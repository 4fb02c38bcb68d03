"""ragseek's model: one DeepSeek-style Transformer (MHA/GQA/MQA/MLA x dense/MoE x MTP), its tokenizer and sampler,
loaded from and saved to transformers folders and GGUF files.

    config.py       ModelConfig, read from / written to a transformers config.json (llama, qwen2, deepseek_v3)
    layers.py       RMSNorm, the SwiGLU MLP, rotary embeddings (YaRN)
    attention.py    MHA / GQA / MQA and MLA (naive and absorbed paths), their KV caches (int8 option)
    moe.py          DeepSeekMoE: fine-grained and shared experts, group-limited routing, aux-loss-free balancing
    transformer.py  the Transformer: blocks, head, MTP modules, the training loss
    decoding.py     batched generation with a KV cache: sampling, stop strings, logprobs, streaming
    sampling.py     SamplingConfig: how generate samples (no torch: the command line reads its fields)
    tokenizer.py    a `tokenizers` BPE with its special tokens and chat template
    checkpoint.py   from_pretrained / save_pretrained: safetensors folders and GGUF
    gguf.py         llama.cpp GGUF files (dequantised) read as a transformers checkpoint
    lora.py         LoRA adapters on any linear layer, merged or not, in PEFT's format
    quant.py        weight-only int8 linears for CPU inference

The names below load on first use (PEP 562), so `from ragseek.model.sampling import SamplingConfig` and the
`ragseek` command line do not import torch.
"""

import importlib

# name -> the module that defines it
_EXPORTS = {
    "ModelConfig": "ragseek.model.config",
    "Transformer": "ragseek.model.transformer",
    "Tokenizer": "ragseek.model.tokenizer",
    "load_tokenizer": "ragseek.model.tokenizer",
    "generate": "ragseek.model.decoding",
    "stream": "ragseek.model.decoding",
    "Generation": "ragseek.model.decoding",
    "SamplingConfig": "ragseek.model.sampling",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ragseek.model' has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(_EXPORTS[name]), name)
    return value
