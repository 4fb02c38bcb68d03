"""How to sample: the one config `generate`, `stream`, the rollouts and `ragseek generate` read (no torch here, so
the command line can build its flags from it without loading the model)."""

from __future__ import annotations

from dataclasses import dataclass

from ragseek.config import config_field as _f


@dataclass
class SamplingConfig:
    max_new_tokens: int = _f(128, "tokens generated at most per prompt")
    temperature: float = _f(0.0, "0 = greedy; otherwise logits are divided by it")
    top_k: int = _f(0, "keep the k most likely tokens (0 = all)")
    top_p: float = _f(1.0, "nucleus: keep the smallest set with mass >= top_p")
    seed: int | None = _f(None, "seed of the sampling generator (None = random)")
    stop: list[str] = _f([], "stop strings; the text is cut before them (repeatable)")

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0 and max_new_tokens >= 0")
