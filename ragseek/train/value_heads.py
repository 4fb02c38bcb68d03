"""Scalar heads on a Transformer trunk: the models RLHF trains besides the policy.

    rm = RewardModel(trunk)                  # r_φ(x, y): one score per sequence, at its last real token
    rm.save_pretrained(folder); load_reward_model(folder)
    critic = Critic(trunk)                   # V(s_t): one value per position (PPO's critic)
    critic = Critic(rm.trunk, rm.value_head) # InstructGPT initialises the value function from the reward model

The reward-model recipe (`recipes/rm.py`) trains a RewardModel; PPO (`recipes/ppo.py`) scores its rollouts with one
and trains a Critic. Both heads read the trunk's final hidden state after its final RMSNorm.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ragseek.errors import reading
from ragseek.model import Transformer

# a subfolder: the trunk's loader reads every *.safetensors
VALUE_HEAD_FILE = "value_head/value_head.safetensors"


class RewardModel(nn.Module):
    """A Transformer trunk and a Linear(dim, 1) value head read at each sequence's last non-pad token."""

    def __init__(self, trunk: Transformer):
        super().__init__()
        self.trunk = trunk
        self.value_head = nn.Linear(trunk.cfg.dim, 1)
        nn.init.normal_(self.value_head.weight, std=trunk.cfg.dim**-0.5)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) right-padded ids and their attention mask -> one reward per sequence (B,)."""
        h, _, _ = self.trunk.hidden_states(input_ids, attention_mask=attention_mask)  # (B, T, d)
        last = attention_mask.sum(-1) - 1  # (B,) index of the last real token
        h_last = self.trunk.norm(h[torch.arange(h.shape[0], device=h.device), last])  # (B, d)
        return self.value_head(h_last).squeeze(-1).float()

    def save_pretrained(self, path: str | Path) -> None:
        """The trunk as an HF folder (save_pretrained) plus value_head/value_head.safetensors inside it."""
        self.trunk.save_pretrained(path)
        (Path(path) / VALUE_HEAD_FILE).parent.mkdir(exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.value_head.state_dict().items()},
            str(Path(path) / VALUE_HEAD_FILE),
        )


def load_reward_model(path: str | Path) -> RewardModel:
    """A reward model saved by `RewardModel.save_pretrained` (safetensors only, no pickle)."""
    path = Path(path)
    head = path / VALUE_HEAD_FILE
    if not head.is_file():
        raise FileNotFoundError(
            f"{head} is missing: {path} is not a reward model folder (train one with `ragseek train rm`)"
        )
    model = RewardModel(Transformer.from_pretrained(path))
    with reading(head, "a readable safetensors file", "it is cut short or corrupt: train or copy it again"):
        weights = load_file(str(head))
    model.value_head.load_state_dict(weights)
    return model


class Critic(nn.Module):
    """V(s_t): a transformer trunk and a linear head on its normalised hidden state, one value per position."""

    def __init__(self, trunk: Transformer, value_head: nn.Linear | None = None):
        super().__init__()
        self.trunk = trunk
        self.value_head = value_head or nn.Linear(trunk.cfg.dim, 1)
        if value_head is None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N, S) -> (N, S − 1): V of the state before each next token, aligned with `logps_of`."""
        h, _, _ = self.trunk.hidden_states(input_ids, attention_mask=attention_mask)
        return self.value_head(self.trunk.norm(h[:, :-1])).squeeze(-1).float()
