"""LLM backends behind one protocol: `local` (ragseek's Transformer), `hf:PATH` (transformers), `openai:MODEL`
(any OpenAI-compatible endpoint), chosen by `load_llm(spec)`; `ragseek serve` puts any of them behind HTTP.

    base.py            the LLM protocol (complete, stream, logprobs), prompts and chats, load_llm, scoring helpers
    local.py           `local`: ragseek's Transformer (the embedded SmolLM2-135M-Instruct + the reader adapter)
    hf.py              `hf:PATH`: a transformers causal-LM folder
    openai_backend.py  `openai:MODEL`: any OpenAI-compatible endpoint
    server.py          the OpenAI-compatible HTTP server over any backend
    page.py            the page `ragseek serve --store` serves at / and its JSON routes (ask, documents)
    cli.py             `ragseek serve`
"""

from ragseek.llm.base import LLM, Message, Prompt, TokenLogprobs, load_llm

__all__ = ["LLM", "Message", "Prompt", "TokenLogprobs", "load_llm"]
