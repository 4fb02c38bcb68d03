"""RLHF with PPO + GAE (the lecture's step 3; Ouyang et al. 2022, arXiv:2203.02155; Schulman et al. 2017).

    python -m ragseek.train.ppo --config configs/ppo.yaml [--set loop.max_steps=50]
    ragseek train ppo --config configs/ppo.yaml

One step, top to bottom (`train`):
    rollout   B prompts, samples_per_prompt completions each (`grpo.sample_groups`)
    score     r(x, y) from the Bradley-Terry reward model (`reward_model`), or rule rewards when none is given
    rewards   r_t = −β log π_old(y_t|·)/π_ref(y_t|·), plus r(x, y) at the last token (`kl_penalized_rewards`)
    GAE       δ_t = r_t + γ V(s_{t+1}) − V(s_t),  Â_t = Σ_ℓ (γλ)^ℓ δ_{t+ℓ},  R_t = Â_t + V(s_t) (`gae`), Â whitened
    update    ppo_epochs optimizer steps over the batch on
              L = −(1/|y|) Σ_t min(r_t Â_t, clip(r_t, 1 ± ε) Â_t) + c_V · ½ max((V − R)², (V_clip − R)²)

The critic is a separate model, not a head on the policy's trunk: a copy of the starting policy's transformer (or of
the reward model's, which InstructGPT uses to initialise the value function) with a linear value head on the final
hidden state. Separate, the value loss cannot pull the policy's features (a shared trunk needs a tuned c_V to keep
the two losses from fighting), the critic may start from the reward model, and at 135M parameters a second copy
costs ~0.5 GB on CPU; the price is a second forward and backward per update. The frozen reference is the starting
policy. Checkpoints hold policy and critic together (one `nn.ModuleDict`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ragseek.model import Transformer
from ragseek.model.config import config_field as _f
from ragseek.train.common import (
    MODEL_HELP,
    cli,
    frozen,
    load_config,
    load_model,
    nested_loop,
    save_final,
    start_run,
    with_run_flags,
)
from ragseek.train.data import EpochSampler, load_prompts
from ragseek.train.grpo import (
    RolloutModel,
    logps_of,
    mean_metrics,
    resolve_reward,
    rollout_sampling,
    sample_groups,
    score,
)
from ragseek.train.loop import (
    LoopConfig,
    autocast,
    build_optimizer,
    micro_batches,
    set_seed,
    train_step,
)
from ragseek.train.losses import gae, kl_penalized_rewards, ppo_policy_loss, value_loss
from ragseek.train.rewards import numbers_match

PLOT_KEYS = ("score_mean", "accuracy", "response_length", "kl", "value_loss", "clip_fraction", "loss")


@dataclass
class PPOConfig:
    model: str = _f("", f"policy to train: {MODEL_HELP}")
    data: str = _f("", 'JSONL prompts, {"prompt"} or {"question", "answer"} rows')
    reward_model: str = _f("", "Bradley-Terry reward model folder (`ragseek train rm`); empty: use `rewards`")
    rewards: list[str] = _f(
        ["numeric_match"], "rule rewards summed when reward_model is empty (names as grpo)"
    )
    samples_per_prompt: int = _f(1, "completions sampled per prompt")
    prompts_per_step: int = _f(8, "prompts per rollout batch")
    ppo_epochs: int = _f(4, "optimizer steps over each rollout batch")
    epsilon: float = _f(0.2, "ε of the clipped surrogate")
    value_clip: float = _f(0.2, "the critic's clip range around its rollout values")
    vf_coef: float = _f(0.5, "c_V: weight of the value loss")
    beta: float = _f(0.05, "β: per-token KL penalty to the frozen reference")
    gamma: float = _f(1.0, "γ of GAE")
    lam: float = _f(0.95, "λ of GAE")
    whiten_advantages: bool = _f(True, "normalise Â to mean 0, std 1 over the batch's response tokens")
    max_prompt_len: int = _f(256, "prompts longer than this many tokens are dropped")
    max_new_tokens: int = _f(64, "completion length cap")
    temperature: float = _f(1.0, "sampling temperature (the logps of the loss use it too)")
    top_p: float = _f(1.0, "nucleus sampling mass")
    loop: LoopConfig = _f(
        LoopConfig(lr=1e-6, max_steps=100, out_dir="runs/ppo"), "optimizer, schedule, checkpoints"
    )

    def __post_init__(self) -> None:
        self.loop = nested_loop(self.loop)
        if not self.data:
            raise ValueError('set data: a JSONL file of {"prompt"} or {"question", "answer"} rows')
        if (self.prompts_per_step * self.samples_per_prompt) % self.loop.grad_accum:
            raise ValueError(
                f"{self.prompts_per_step * self.samples_per_prompt} sequences per step do not split into "
                f"loop.grad_accum={self.loop.grad_accum} equal micro-batches: change one of them"
            )


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


def _whiten(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.bool()
    mean, std = x[m].mean(), x[m].std()
    return torch.where(m, (x - mean) / (std + 1e-8), torch.zeros_like(x))


def train(cfg: PPOConfig) -> list[dict]:
    """Run PPO as configured; returns the metrics rows of this run (also in `<out_dir>/metrics.jsonl`)."""
    set_seed(cfg.loop.seed)
    policy, tokenizer = load_model(cfg.model)
    reference = frozen(copy.deepcopy(policy))
    reward_fns = [] if cfg.reward_model else [resolve_reward(r) for r in cfg.rewards]
    if cfg.reward_model:  # the critic starts as a copy of the reward model (InstructGPT)
        from ragseek.train.reward_model import load_reward_model

        reward_model = frozen(load_reward_model(cfg.reward_model))
        critic = Critic(copy.deepcopy(reward_model.trunk), copy.deepcopy(reward_model.value_head))
    else:
        reward_model, critic = None, Critic(copy.deepcopy(policy))
    models = nn.ModuleDict({"policy": policy, "critic": critic}).train()
    rows = load_prompts(cfg.data, tokenizer, cfg.max_prompt_len)
    sampler = EpochSampler(len(rows), cfg.prompts_per_step, seed=cfg.loop.seed)
    optimizer = build_optimizer(models, cfg.loop)
    run = start_run(cfg, cfg.loop, models, optimizer, sampler)
    rollout_model = RolloutModel(policy, cfg.loop.dtype)
    G = cfg.samples_per_prompt

    def loss_fn(mb: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        mask = mb["response_mask"][:, 1:]
        logps = logps_of(policy, mb, cfg.temperature)
        pg, pg_metrics = ppo_policy_loss(logps, mb["old_logps"], mb["advantages"], mask, cfg.epsilon)
        values = critic(mb["input_ids"], mb["attention_mask"])
        vf, vf_metrics = value_loss(values, mb["old_values"], mb["returns"], mask, cfg.value_clip)
        return pg + cfg.vf_coef * vf, {**pg_metrics, "policy_loss": pg.item(), **vf_metrics}

    for step in range(run.start, cfg.loop.max_steps):
        batch_rows = [rows[i] for i in sampler.next_batch()]
        sampling = rollout_sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.loop.seed, step)
        t0 = time.perf_counter()
        rollout = sample_groups(
            rollout_model(), tokenizer, [r["prompt_ids"] for r in batch_rows], G, sampling
        )
        t_gen = time.perf_counter() - t0
        batch = rollout.tensors()
        mask = batch["response_mask"][:, 1:]
        with torch.no_grad(), autocast(cfg.loop.dtype):
            if reward_model is not None:
                scores, each = reward_model(batch["input_ids"], batch["attention_mask"]).float(), []
            else:
                prompts = [r["prompt"] for r in batch_rows for _ in range(G)]
                answers = [r["answer"] for r in batch_rows for _ in range(G)]
                scores, each = score(
                    reward_fns, [1.0] * len(reward_fns), prompts, rollout.completions, answer=answers
                )
                scores = scores.float()
            old_logps = logps_of(policy, batch, cfg.temperature)
            ref_logps = logps_of(reference, batch, cfg.temperature)
            old_values = critic(batch["input_ids"], batch["attention_mask"])
            rewards = kl_penalized_rewards(scores, old_logps, ref_logps, mask, cfg.beta)
            advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = _whiten(advantages, mask)
        batch.update(old_logps=old_logps, old_values=old_values, advantages=advantages, returns=returns)
        updates = [
            train_step(optimizer, micro_batches(batch, cfg.loop.grad_accum), loss_fn, cfg.loop, step)
            for _ in range(cfg.ppo_epochs)
        ]
        t_step = time.perf_counter() - t0
        generated = sum(rollout.lengths)
        metrics = {
            **mean_metrics(updates),
            "score_mean": scores.mean().item(),
            "score_std": scores.std().item(),
            "kl": ((old_logps - ref_logps) * mask)
            .sum(-1)
            .mean()
            .item(),  # Σ_t log π/π_ref, mean over sequences
            "entropy": rollout.entropy(),
            "response_length": generated / len(rollout.lengths),
            "tok_s": generated / t_step,
            "gen_share": t_gen / t_step,
            "step_s": t_step,
        }
        if each:
            metrics["accuracy"] = (each[0] >= 1).float().mean().item()
        elif all(r.get("answer") is not None for r in batch_rows):  # a reward model's policy, checked by rule
            answers = [r["answer"] for r in batch_rows for _ in range(G)]
            metrics["accuracy"] = sum(map(numbers_match, rollout.completions, answers)) / len(answers)
        run.log(step + 1, metrics, int(batch["attention_mask"].sum()))
        run.checkpoint(step + 1)
    run.close(PLOT_KEYS)
    save_final(policy, tokenizer, run.out / "final")
    return run.rows


def main(
    config_path: str | None, overrides: list[str], out: str | None = None, resume: bool = False
) -> list[dict]:
    """`ragseek train ppo`: the config file, then the --set overrides, then --out and --resume."""
    return train(with_run_flags(load_config(PPOConfig, config_path, overrides), out, resume))


if __name__ == "__main__":
    cli(main)
