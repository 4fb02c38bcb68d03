"""A Bradley-Terry reward model: a scalar value head on a ragseek Transformer, trained on preference pairs.

    ragseek train rm --config configs/rm.yaml [--set loop.max_steps=200] [--out DIR] [--resume]

r_φ(x, y) = w · norm(h_L)[last token of x + y] + b, the trunk's final hidden state (after its final RMSNorm) at the
last non-pad token, through a Linear(dim, 1). Trained on JSONL {"prompt", "chosen", "rejected"} with the lecture's

    L(φ) = −E_{(x, y_b, y_w)~D} [ log σ(r_φ(x, y_b) − r_φ(x, y_w)) ]          (`losses.bradley_terry_loss`)

and scored by held-out accuracy (the share of pairs with r(chosen) > r(rejected)). Saved to `<out_dir>/final`:
the trunk with `save_pretrained`, its tokenizer, and the head in value_head/value_head.safetensors (`value_heads.RewardModel`); `value_heads.load_reward_model(path)`
reads it back (PPO scores its rollouts with it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ragseek.config import config_field as _f
from ragseek.model import Tokenizer
from ragseek.train.data import EpochSampler, collate_preference, load_preference
from ragseek.train.distributed import World
from ragseek.train.loop import LoopConfig, build_optimizer, set_seed, train_step
from ragseek.train.losses import bradley_terry_loss
from ragseek.train.run import (
    MODEL_HELP,
    RecipeConfig,
    load_model,
    loop_field,
    preference_micro_batches,
    recipe_main,
    start_run,
)
from ragseek.train.value_heads import RewardModel

PLOT_KEYS = ("loss", "accuracy", "margin", "eval_accuracy", "lr")


@dataclass
class RewardModelConfig(RecipeConfig):
    model: str = _f("", f"the trunk to start from: {MODEL_HELP}")
    data: str = _f("", 'JSONL preference pairs {"prompt", "chosen", "rejected"}')
    eval_data: str = _f(
        "", "held-out pairs for accuracy (empty: the last eval_fraction of data, never trained on)"
    )
    eval_fraction: float = _f(0.1, "share of data held out when eval_data is empty")
    max_len: int = _f(512, "tokens per prompt + response (the end is cut)")
    batch_size: int = _f(8, "pairs per optimizer step")
    eval_batch_size: int = _f(16, "pairs per forward pass when evaluating")
    loop: LoopConfig = loop_field(lr=1e-5, out_dir="runs/rm")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eval_data and not 0 < self.eval_fraction < 1:
            raise ValueError(
                f"eval_fraction={self.eval_fraction}: hold out a share in (0, 1), or set eval_data"
            )


def pair_rewards(model: RewardModel, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """r(x, y_chosen), r(x, y_rejected) for a `collate_preference` batch (chosen rows first)."""
    return model(batch["input_ids"], batch["attention_mask"]).chunk(2)


@torch.no_grad()
def evaluate(
    model: RewardModel, pairs: list[dict], pad_id: int, batch_size: int, world: World | None = None
) -> dict[str, float]:
    """Held-out accuracy P(r(chosen) > r(rejected)), mean margin and Bradley-Terry loss over all pairs (under
    torchrun, each rank scores its share, `World.eval_share`, and the rewards are gathered)."""
    world = world or World()
    was_training = model.training
    model.eval()
    share, _ = world.eval_share(pairs)
    chosen, rejected = [], []
    for i in range(0, len(share), batch_size):
        c, r = pair_rewards(model, world.to_device(collate_preference(share[i : i + batch_size], pad_id)))
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    chosen, rejected = (world.gather(torch.cat(x))[: len(pairs)] for x in (chosen, rejected))
    _, metrics = bradley_terry_loss(chosen, rejected)
    return {
        "eval_accuracy": metrics["accuracy"],
        "eval_margin": metrics["margin"],
        "eval_loss": metrics["loss"],
    }


def split_pairs(cfg: RewardModelConfig, tokenizer: Tokenizer) -> tuple[list[dict], list[dict]]:
    pairs = load_preference(cfg.data, tokenizer, cfg.max_len)
    if cfg.eval_data:
        return pairs, load_preference(cfg.eval_data, tokenizer, cfg.max_len)
    n_eval = max(1, round(len(pairs) * cfg.eval_fraction))
    if n_eval >= len(pairs):
        raise ValueError(f"{len(pairs)} pairs in {cfg.data}: too few to hold out {n_eval}; set eval_data")
    return pairs[:-n_eval], pairs[-n_eval:]


def train(cfg: RewardModelConfig) -> list[dict]:
    """Train the reward model as configured; returns this run's metrics rows (also in `<out_dir>/metrics.jsonl`)."""
    world = World.join(cfg.loop)
    set_seed(cfg.loop.seed)
    trunk, tokenizer = load_model(cfg.model)
    model = RewardModel(trunk).train()
    train_pairs, eval_pairs = split_pairs(cfg, tokenizer)
    sampler = EpochSampler(len(train_pairs), cfg.batch_size, seed=cfg.loop.seed, world=world)
    trained = world.parallelize(model, cfg.loop)
    optimizer = build_optimizer(model, cfg.loop)
    run = start_run(cfg, cfg.loop, trained, optimizer, sampler)

    def loss_fn(batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return bradley_terry_loss(*pair_rewards(model, batch))

    for step in range(run.start, cfg.loop.max_steps):
        micro = preference_micro_batches(
            [train_pairs[i] for i in sampler.next_batch()], cfg.loop, tokenizer.pad_id
        )
        metrics = train_step(optimizer, micro, loss_fn, cfg.loop, step, trained)
        done = step + 1
        if done == cfg.loop.max_steps or (cfg.loop.eval_every and done % cfg.loop.eval_every == 0):
            metrics.update(evaluate(model, eval_pairs, tokenizer.pad_id, cfg.eval_batch_size, world))
        run.end_step(done, metrics, sum(int(mb["attention_mask"].sum()) for mb in micro))
    return run.finish(PLOT_KEYS, model, tokenizer)


main = recipe_main(RewardModelConfig, train)
