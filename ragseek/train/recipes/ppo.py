"""RLHF with PPO + GAE (the lecture's step 3; Ouyang et al. 2022, arXiv:2203.02155; Schulman et al. 2017).

    ragseek train ppo --config configs/ppo.yaml [--set loop.max_steps=50]
    torchrun --nproc-per-node 4 -m ragseek.train.ppo --config configs/ppo.yaml    # prompts split over 4 ranks

One step, top to bottom (`train`):
    rollout   B prompts, samples_per_prompt completions each (`rollout.sample_groups`)
    score     r(x, y) from the Bradley-Terry reward model (`value_heads.RewardModel`), or rule rewards when none is given
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

Under torchrun each rank samples its share of the prompts (a prompt's samples stay on one rank), its reference and
reward model are whole frozen copies, advantages are whitened with the mean and std of every rank's tokens, and
the scores are all-gathered for the log. Both losses are sequence means, so the run is the one-process run up to
rounding (`distributed.py`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ragseek.config import config_field as _f
from ragseek.train.data import EpochSampler, load_prompts
from ragseek.train.distributed import World
from ragseek.train.loop import LoopConfig, autocast, build_optimizer, set_seed, train_epochs
from ragseek.train.losses import gae, kl_penalized_rewards, ppo_policy_loss, value_loss
from ragseek.train.rewards import numbers_match, resolve_reward
from ragseek.train.rollout import RolloutConfig, RolloutModel, accuracy, logps_of, sample_groups, score
from ragseek.train.run import MODEL_HELP, RecipeConfig, frozen, load_model, loop_field, recipe_main, start_run
from ragseek.train.value_heads import Critic, load_reward_model

PLOT_KEYS = ("score_mean", "accuracy", "response_length", "kl", "value_loss", "clip_fraction", "loss")


@dataclass
class PPOConfig(RolloutConfig, RecipeConfig):
    model: str = _f("", f"policy to train: {MODEL_HELP}")
    data: str = _f("", 'JSONL prompts, {"prompt"} or {"question", "answer"} rows')
    reward_model: str = _f("", "Bradley-Terry reward model folder (`ragseek train rm`); empty: use `rewards`")
    rewards: list[str] = _f(
        ["numeric_match"], "rule rewards summed when reward_model is empty (names as grpo: rewards.REWARDS)"
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
    loop: LoopConfig = loop_field(lr=1e-6, out_dir="runs/ppo")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.prompts_per_step * self.samples_per_prompt) % self.loop.grad_accum:
            raise ValueError(
                f"{self.prompts_per_step * self.samples_per_prompt} sequences per step do not split into "
                f"loop.grad_accum={self.loop.grad_accum} equal micro-batches: change one of them"
            )


def _whiten(x: Tensor, mask: Tensor, world: World) -> Tensor:
    """(x − mean) / (std + 1e-8) on the response tokens, mean and (unbiased) std over every rank's tokens."""
    m = mask.bool()
    n, total, squares = world.sum(torch.stack([m.sum(), x[m].sum(), x[m].square().sum()]).double()).tolist()
    mean = total / n
    std = max((squares - n * mean**2) / (n - 1), 0.0) ** 0.5
    return torch.where(m, (x - mean) / (std + 1e-8), torch.zeros_like(x))


def train(cfg: PPOConfig) -> list[dict]:
    """Run PPO as configured; returns the metrics rows of this run (also in `<out_dir>/metrics.jsonl`)."""
    world = World.join(cfg.loop)
    set_seed(cfg.loop.seed)
    policy, tokenizer = load_model(cfg.model)
    reference = world.place(frozen(copy.deepcopy(policy)))
    reward_fns = [] if cfg.reward_model else [resolve_reward(r) for r in cfg.rewards]
    # with a reward model the critic starts as a copy of it (InstructGPT)
    if cfg.reward_model:
        reward_model = world.place(frozen(load_reward_model(cfg.reward_model)))
        critic = Critic(copy.deepcopy(reward_model.trunk), copy.deepcopy(reward_model.value_head))
    else:
        reward_model, critic = None, Critic(copy.deepcopy(policy))
    models = nn.ModuleDict({"policy": policy, "critic": critic}).train()
    rows = load_prompts(cfg.data, tokenizer, cfg.max_prompt_len)
    # prompts_per_step is global: each rank samples its share of the prompts
    sampler = EpochSampler(len(rows), cfg.prompts_per_step, seed=cfg.loop.seed, world=world)
    sharded = world.size > 1 and cfg.loop.parallel == "fsdp"
    rollout_model = RolloutModel(policy, cfg.loop.dtype, sharded, cfg.compile_rollouts)
    trained = world.parallelize(models, cfg.loop)
    optimizer = build_optimizer(models, cfg.loop)
    run = start_run(cfg, cfg.loop, trained, optimizer, sampler)

    def loss_fn(mb: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        mask = mb["response_mask"][:, 1:]
        logps = logps_of(policy, mb, cfg.temperature)
        pg, pg_metrics = ppo_policy_loss(logps, mb["old_logps"], mb["advantages"], mask, cfg.epsilon)
        values = critic(mb["input_ids"], mb["attention_mask"])
        vf, vf_metrics = value_loss(values, mb["old_values"], mb["returns"], mask, cfg.value_clip)
        return pg + cfg.vf_coef * vf, {**pg_metrics, "policy_loss": pg.item(), **vf_metrics}

    for step in range(run.start, cfg.loop.max_steps):
        sampling = cfg.sampling(cfg.loop.seed, step)
        prompts = [rows[i] for i in sampler.next_batch()]
        first = world.rank * len(prompts) * cfg.samples_per_prompt
        rollout = sample_groups(rollout_model(), tokenizer, prompts, cfg.samples_per_prompt, sampling, first)
        batch = world.to_device(rollout.tensors())
        mask = batch["response_mask"][:, 1:]
        with torch.no_grad(), autocast(cfg.loop.dtype):
            if reward_model is not None:
                scores, each = reward_model(batch["input_ids"], batch["attention_mask"]).float(), []
            else:
                scores, each = score(reward_fns, [1.0] * len(reward_fns), rollout)
                scores = scores.float().to(world.device)
            old_logps = logps_of(policy, batch, cfg.temperature)
            ref_logps = logps_of(reference, batch, cfg.temperature)
            old_values = critic(batch["input_ids"], batch["attention_mask"])
            rewards = kl_penalized_rewards(scores, old_logps, ref_logps, mask, cfg.beta)
            advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = _whiten(advantages, mask, world)
        batch.update(old_logps=old_logps, old_values=old_values, advantages=advantages, returns=returns)
        metrics = train_epochs(optimizer, batch, loss_fn, cfg.loop, step, cfg.ppo_epochs, trained)
        # every rank's scores: the logged statistics are the whole batch's
        scores = world.gather(scores)
        metrics.update(
            score_mean=scores.mean().item(),
            score_std=scores.std().item(),
            # Σ_t log π/π_ref, mean over sequences
            kl=((old_logps - ref_logps) * mask).sum(-1).mean().item(),
            **rollout.metrics(),
        )
        if each:
            metrics["accuracy"] = accuracy([world.gather(r) for r in each])
        else:
            # a reward model's policy, checked by rule where every row has an answer (nan: one has none)
            hits = [
                float(numbers_match(c, a)) if a is not None else math.nan
                for c, a in zip(rollout.completions, rollout.column("answer"), strict=True)
            ]
            hits = world.gather(torch.tensor(hits, dtype=torch.float64))
            if not hits.isnan().any():
                metrics["accuracy"] = hits.mean().item()
        run.end_step(step + 1, metrics, int(batch["attention_mask"].sum()))
    return run.finish(PLOT_KEYS, policy, tokenizer)


main = recipe_main(PPOConfig, train)
