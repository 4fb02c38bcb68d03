"""`local`: ragseek's own Transformer and tokenizer (default: the embedded SmolLM2-135M-Instruct).

Generation runs through `ragseek.model.decoding` (left-padded batches with a KV cache); prompts are sorted by
length so a batch holds similar lengths. Scoring is one right-padded forward per batch with an attention mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ragseek.llm.base import Prompt, TokenLogprobs, check_pairs, sum_continuations, text_logprobs

if TYPE_CHECKING:
    import torch

    from ragseek.model.tokenizer import Tokenizer
    from ragseek.model.transformer import Transformer


class LocalLLM:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        name: str = "local",
        batch_size: int = 8,
        max_batch_tokens: int = 2048,
    ):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        # prompts generated together; padded tokens per scoring forward (its logits are B·T·vocab floats)
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens

    @classmethod
    def from_path(cls, path: str | Path | None = None, **kwargs) -> LocalLLM:
        """The embedded SmolLM2-135M-Instruct with the shipped reader adapter (path None), the raw SmolLM2
        ("base"), an adapter folder (adapter_config.json: onto its base, `adapter_base`), or an HF folder / .gguf.
        An adapter is merged into the weights: it costs nothing per token."""
        from ragseek.defaults import reader_adapter, smollm2_gguf
        from ragseek.model.lora import CONFIG_FILE, adapter_base, load_adapter, merge_and_unload
        from ragseek.model.tokenizer import load_tokenizer
        from ragseek.model.transformer import Transformer

        if path is None:
            source, adapter, name = smollm2_gguf(), reader_adapter(), "local"
        elif str(path) == "base":
            source, adapter, name = smollm2_gguf(), None, "local:base"
        else:
            folder = Path(path).expanduser()
            adapter = folder if (folder / CONFIG_FILE).is_file() else None
            source, name = (adapter_base(adapter) if adapter else folder), f"local:{path}"
        model = Transformer.from_pretrained(source)
        if adapter is not None:
            model = merge_and_unload(load_adapter(model, adapter))
        return cls(model, load_tokenizer(source), name, **kwargs)

    def render(self, prompt: Prompt) -> str:
        """A raw prompt as is; a chat through the tokenizer's chat template, ready for the assistant's turn."""
        return (
            prompt
            if isinstance(prompt, str)
            else self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        )

    def complete(
        self,
        prompts: Sequence[Prompt],
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: list[str] | None = None,
    ) -> list[str]:
        from ragseek.model.decoding import generate_ids
        from ragseek.model.sampling import SamplingConfig

        cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, stop=list(stop or []))
        ids = [self.tokenizer.encode(self.render(p)) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [""] * len(ids)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            gens = generate_ids(
                self.model, [ids[i] for i in batch], cfg, {self.tokenizer.eos_id}, self.tokenizer
            )
            for i, g in zip(batch, gens, strict=True):
                out[i] = g.text
        return out

    def stream(
        self, prompt: Prompt, max_tokens: int = 256, temperature: float = 0.0, stop: list[str] | None = None
    ) -> Iterator[str]:
        from ragseek.model.decoding import stream
        from ragseek.model.sampling import SamplingConfig

        cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, stop=list(stop or []))
        return stream(self.model, self.tokenizer, self.render(prompt), cfg)

    def logprobs(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[float]:
        check_pairs(prompts, continuations)
        prompt_ids = [self.tokenizer.encode(self.render(p)) for p in prompts]
        cont_ids = [self.tokenizer.encode(c) for c in continuations]
        return sum_continuations(
            self._forward, prompt_ids, cont_ids, self.tokenizer.pad_id, self.max_batch_tokens
        )

    def token_logprobs(self, texts: Sequence[str], top: int = 0) -> list[TokenLogprobs]:
        seqs = [self.tokenizer.encode(t) for t in texts]
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        return text_logprobs(self._forward, decode, seqs, self.tokenizer.pad_id, top, self.max_batch_tokens)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.model.cfg.max_seq_len:
            raise ValueError(
                f"{ids.shape[1]} tokens exceed the model's max_seq_len {self.model.cfg.max_seq_len}: shorten the text"
            )
        return self.model(ids, attention_mask=mask)
