"""GRPO with rule-based rewards (DeepSeekMath, arXiv:2402.03300; the lecture's v2 of the addition story).

    ragseek train grpo --config configs/grpo.yaml [--set loop.max_steps=50 --set group_size=4]
    torchrun --nproc-per-node 4 -m ragseek.train.grpo --config configs/grpo.yaml   # groups split over 4 ranks

One step, top to bottom (`train`):
    rollout    B prompts × G completions, batched generation with the KV cache, each prompt prefilled once
               (`rollout.sample_groups`); with `loop.dtype: bf16` from a bf16 copy of the policy (`RolloutModel`)
    reward     r_i = Σ_k w_k · f_k(prompts, completions, **columns), TRL's reward signature (`rewards.py`,
               `rollout.score`)
    advantage  A_i = (r_i − mean_G(r)) / (std_G(r) + ε), one per completion (`grpo_advantages`)
    update     μ optimizer steps on L = −(1/G) Σ_i F(x, y_i) with the clipped ratio and β·k3 (`grpo_loss`);
               μ = 1: old_logps = None (ratio 1, the vanilla policy gradient); μ > 1: old_logps from one no-grad
               forward of the rollout policy; β = 0: no reference model exists at all. Every logp forward runs
               each prompt once for its G completions and the head only where it scores a completion token
               (`rollout.response_logps`, exact).
Every step logs reward mean/std, accuracy, KL, clip fraction, entropy, response length, tok/s and the share of time
spent generating; checkpoints (weights, AdamW, RNG, data position) make `--resume` continue a killed
run with the same next losses. The final policy is saved (with its tokenizer) to `<out_dir>/final`.

Under torchrun each rank samples the groups of its share of the B prompts (a group never straddles two ranks), each
completion from its own generator (`sample_groups`), so the step's completions are those of one process; the
rewards are all-gathered, so advantages (whatever scale_rewards) and the logged statistics are the whole batch's;
every rank refreshes its rollout copy before sampling. The loss curve is the one-process curve (`distributed.py`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from ragseek.config import config_field as _f
from ragseek.model.lora import LoRAConfig
from ragseek.train.data import EpochSampler, load_prompts
from ragseek.train.distributed import World
from ragseek.train.loop import LoopConfig, autocast, build_optimizer, set_seed, train_epochs
from ragseek.train.losses import (
    ADVANTAGE_STD,
    GRPO_AGGREGATION,
    AdvantageScale,
    GRPOLossType,
    grpo_advantages,
    grpo_loss,
)
from ragseek.train.rewards import resolve_reward
from ragseek.train.rollout import RolloutConfig, RolloutModel, accuracy, logps_of, sample_groups, score
from ragseek.train.run import (
    LORA_HELP,
    MODEL_HELP,
    RecipeConfig,
    frozen,
    load_model,
    loop_field,
    recipe_main,
    start_run,
)
from ragseek.train.tasks.math_eval import evaluate_math

PLOT_KEYS = (
    "reward_mean",
    "accuracy",
    "eval_accuracy",
    "response_length",
    "entropy",
    "kl",
    "clip_fraction",
    "loss",
)


@dataclass
class GRPOConfig(RolloutConfig, RecipeConfig):
    model: str = _f("", f"policy to train: {MODEL_HELP}")
    data: str = _f("", 'JSONL prompts, {"prompt"} or {"question", "answer"} rows; columns go to the rewards')
    rewards: list[str] = _f(
        ["numeric_match"],
        "reward functions: numeric_match | format | code | reader_f1 | reader_citation | reader_dont_know | "
        "reader_format, or module:function",
    )
    reward_weights: list[float] = _f([], "one weight per reward function (empty: all 1)")
    group_size: int = _f(8, "G: completions sampled per prompt")
    prompts_per_step: int = _f(4, "B: prompts per rollout batch (B·G completions per step)")
    mu: int = _f(1, "μ: optimizer updates per rollout batch (1: on-policy, ratio 1)")
    epsilon: float = _f(0.2, "ε: the clip range's lower side, 1 − ε")
    epsilon_high: float | None = _f(None, "the clip range's upper side, 1 + ε_high (None: ε; DAPO: 0.28)")
    beta: float = _f(0.0, "β: weight of the k3 KL to the frozen reference (0: no reference model)")
    loss_type: GRPOLossType = _f(
        "grpo", "grpo (sequence mean) | dapo (token mean) | dr_grpo (sum / (B·L_max))"
    )
    scale_rewards: AdvantageScale = _f("group", "advantage std: group | batch | none (Dr. GRPO)")
    max_prompt_len: int = _f(256, "prompts longer than this many tokens are dropped")
    eval_data: str = _f(
        "", "JSONL {question, answer} scored greedily every loop.eval_every steps (eval math)"
    )
    eval_n: int = _f(100, "rows of eval_data used")
    lora: LoRAConfig | None = _f(None, LORA_HELP)
    loop: LoopConfig = loop_field(lr=1e-6, out_dir="runs/grpo")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in GRPO_AGGREGATION or self.scale_rewards not in ADVANTAGE_STD:
            raise ValueError(
                f"loss_type={self.loss_type!r}, scale_rewards={self.scale_rewards!r}: choose loss_type from "
                f"{sorted(GRPO_AGGREGATION)} and scale_rewards from {sorted(ADVANTAGE_STD)}"
            )
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ValueError(
                f"{len(self.reward_weights)} reward_weights for {len(self.rewards)} rewards: give one per reward"
            )
        if self.group_size < 2 or self.mu < 1:
            raise ValueError(f"group_size={self.group_size}, mu={self.mu}: need group_size >= 2 and mu >= 1")
        if (self.prompts_per_step * self.group_size) % self.loop.grad_accum:
            raise ValueError(
                f"B·G = {self.prompts_per_step * self.group_size} completions do not split into "
                f"loop.grad_accum={self.loop.grad_accum} equal micro-batches: change one of them"
            )


# ---------------------------------------------------------------------------------------------------------------------
# the recipe


def train(cfg: GRPOConfig) -> list[dict]:
    """Run GRPO as configured; returns the metrics rows of this run (also in `<out_dir>/metrics.jsonl`)."""
    world = World.join(cfg.loop)
    set_seed(cfg.loop.seed)
    model, tokenizer = load_model(cfg.model, cfg.lora)
    model.train()
    # β = 0: no reference is kept at all; otherwise a frozen copy of the starting policy (made before any resume).
    reference = world.place(frozen(copy.deepcopy(model))) if cfg.beta else None
    reward_fns = [resolve_reward(r) for r in cfg.rewards]
    weights = cfg.reward_weights or [1.0] * len(reward_fns)
    rows = load_prompts(cfg.data, tokenizer, cfg.max_prompt_len)
    eval_rows = (
        load_prompts(cfg.eval_data, tokenizer, cfg.max_prompt_len)[: cfg.eval_n] if cfg.eval_data else []
    )
    # prompts_per_step is global: each rank samples the groups of its share of the prompts, whole
    sampler = EpochSampler(len(rows), cfg.prompts_per_step, seed=cfg.loop.seed, world=world)
    sharded = world.size > 1 and cfg.loop.parallel == "fsdp"
    rollout_model = RolloutModel(model, cfg.loop.dtype, sharded, cfg.compile_rollouts)
    trained = world.parallelize(model, cfg.loop)
    optimizer = build_optimizer(model, cfg.loop)
    run = start_run(cfg, cfg.loop, trained, optimizer, sampler)
    G = cfg.group_size

    def loss_fn(mb: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return grpo_loss(
            logps_of(model, mb, cfg.temperature),
            mb.get("old_logps"),
            mb.get("ref_logps"),
            mb["advantages"],
            mb["response_mask"][:, 1:],
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            max_completion_length=cfg.max_new_tokens,
        )

    for step in range(run.start, cfg.loop.max_steps):
        sampling = cfg.sampling(cfg.loop.seed, step)
        prompts = [rows[i] for i in sampler.next_batch()]
        # this rank's groups are sequences [first, first + len(prompts)·G) of the step's B·G
        first = world.rank * len(prompts) * G
        rollout = sample_groups(rollout_model(), tokenizer, prompts, G, sampling, first)
        rewards, each = score(reward_fns, weights, rollout)
        # every rank's rewards: the advantages (whole groups, or the batch's std) and the logged statistics
        rewards, each = world.gather(rewards), [world.gather(r) for r in each]
        advantages = grpo_advantages(rewards, G, cfg.scale_rewards)[world.share(len(rewards))]
        batch = world.to_device({**rollout.tensors(), "advantages": advantages})
        with torch.no_grad(), autocast(cfg.loop.dtype):
            # μ > 1: the rollout policy's logps, fixed for the μ updates
            if cfg.mu > 1:
                batch["old_logps"] = logps_of(model, batch, cfg.temperature)
            if reference is not None:
                batch["ref_logps"] = logps_of(reference, batch, cfg.temperature)
        metrics = train_epochs(optimizer, batch, loss_fn, cfg.loop, step, cfg.mu, trained)
        metrics.update(
            reward_mean=rewards.mean().item(),
            reward_std=rewards.std().item(),
            **{f"reward_{name}": r.mean().item() for name, r in zip(cfg.rewards, each, strict=True)},
            accuracy=accuracy(each),
            **rollout.metrics(),
        )
        if eval_rows and cfg.loop.eval_every and (step + 1) % cfg.loop.eval_every == 0:
            # sharded: greedy decoding from the whole copy (bf16 with loop.dtype=bf16); each rank its share
            evaluated = rollout_model() if sharded else model
            scored = evaluate_math(evaluated, tokenizer, world.eval_share(eval_rows)[0], cfg.max_new_tokens)
            correct = world.gather(torch.tensor(scored["correct"], dtype=torch.float64))[: len(eval_rows)]
            metrics["eval_accuracy"] = correct.mean().item()
        run.end_step(step + 1, metrics, int(batch["attention_mask"].sum()))
    return run.finish(PLOT_KEYS, model, tokenizer)


main = recipe_main(GRPOConfig, train)
