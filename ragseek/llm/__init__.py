"""LLM backends behind one protocol: `local` (ragseek's Transformer), `hf:PATH` (transformers), `openai:MODEL`
(any OpenAI-compatible endpoint), chosen by `load_llm(spec)`; `ragseek serve` puts any of them behind HTTP."""

from ragseek.llm.base import LLM, Message, Prompt, TokenLogprobs, load_llm

__all__ = ["LLM", "Message", "Prompt", "TokenLogprobs", "load_llm"]
