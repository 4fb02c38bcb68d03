"""`hf:PATH`: any local transformers causal-LM folder (AutoModelForCausalLM + AutoTokenizer, no hub access).

Raw prompts get the tokenizer's special tokens (e.g. BOS); chats are rendered with the tokenizer's chat template,
which already holds them. Generation is `model.generate` on left-padded batches; scoring is one right-padded
forward per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragseek.llm.base import Prompt, TokenLogprobs, check_pairs, sum_continuations, text_logprobs
from ragseek.model.decoding import find_stop

if TYPE_CHECKING:
    import torch


class HFLLM:
    def __init__(
        self, model: Any, tokenizer: Any, name: str, batch_size: int = 8, max_batch_tokens: int = 2048
    ):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.batch_size = batch_size  # prompts generated together
        self.max_batch_tokens = max_batch_tokens  # padded tokens per scoring forward
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(
                f"{name}: the tokenizer has neither a pad nor an eos token; set one in tokenizer_config.json"
            )
        self.pad_id: int = pad

    @classmethod
    def from_path(cls, path: str | Path, **kwargs) -> HFLLM:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder}: hf:PATH needs a local transformers folder (config.json, weights, tokenizer files)"
            )
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        return cls(model, tokenizer, f"hf:{path}", **kwargs)

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if not self.tokenizer.chat_template:
            raise ValueError(
                f"{self.name}: the tokenizer has no chat template; pass raw string prompts instead"
            )
        text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def complete(
        self,
        prompts: Sequence[Prompt],
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: list[str] | None = None,
    ) -> list[str]:
        ids = [self.encode(p) for p in prompts]
        if max_tokens == 0:
            return [""] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [""] * len(ids)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            tokens, mask = self._left_pad([ids[i] for i in batch])
            new = self.model.generate(
                input_ids=tokens, attention_mask=mask, **self._sampling(max_tokens, temperature, stop)
            )[:, tokens.shape[1] :]
            for i, row in zip(batch, new, strict=True):
                out[i] = _cut(self.tokenizer.decode(row, skip_special_tokens=True), stop or [])
        return out

    def stream(
        self, prompt: Prompt, max_tokens: int = 256, temperature: float = 0.0, stop: list[str] | None = None
    ) -> Iterator[str]:
        from threading import Thread

        from transformers import TextIteratorStreamer

        tokens, mask = self._left_pad([self.encode(prompt)])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(
            input_ids=tokens,
            attention_mask=mask,
            streamer=streamer,
            **self._sampling(max_tokens, temperature, stop),
        )
        Thread(target=self.model.generate, kwargs=kwargs, daemon=True).start()
        return _stream_until_stop(streamer, stop or [])

    def logprobs(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[float]:
        check_pairs(prompts, continuations)
        prompt_ids = [self.encode(p) for p in prompts]
        cont_ids = [self.tokenizer.encode(c, add_special_tokens=False) for c in continuations]
        return sum_continuations(self._forward, prompt_ids, cont_ids, self.pad_id, self.max_batch_tokens)

    def token_logprobs(self, texts: Sequence[str], top: int = 0) -> list[TokenLogprobs]:
        seqs = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        return text_logprobs(self._forward, decode, seqs, self.pad_id, top, self.max_batch_tokens)

    # ----------------------------------------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).logits

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, T - len(s) :] = torch.tensor(s)
            mask[row, T - len(s) :] = 1
        return ids, mask

    def _sampling(self, max_tokens: int, temperature: float, stop: list[str] | None) -> dict:
        """Plain temperature sampling (or greedy), overriding whatever generation_config.json sets."""
        sampling = (
            dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            if temperature > 0
            else dict(do_sample=False)
        )
        if stop:
            sampling.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        return dict(max_new_tokens=max_tokens, pad_token_id=self.pad_id, **sampling)


def _cut(text: str, stop: Sequence[str]) -> str:
    at = find_stop(text, stop)
    return text if at is None else text[:at]


def _stream_until_stop(pieces: Iterable[str], stop: Sequence[str]) -> Iterator[str]:
    """Re-yield streamed text up to the first stop string; text that may begin one is held back until it cannot."""
    hold = max((len(s) - 1 for s in stop), default=0)
    text, emitted = "", 0
    for piece in pieces:
        text += piece
        cut = _cut(text, stop)
        if len(cut) < len(text):
            if len(cut) > emitted:
                yield cut[emitted:]
            return
        if len(text) - hold > emitted:
            yield text[emitted : len(text) - hold]
            emitted = len(text) - hold
    if len(text) > emitted:
        yield text[emitted:]
