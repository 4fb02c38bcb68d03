"""Direct preference optimisation against a frozen reference (Rafailov et al. 2023), the lecture's form:

    L = −E [ log σ( β (1/|y⁺|) Σ_t log π_θ(y⁺_t|x, y⁺_<t)/π_ref(y⁺_t|x, y⁺_<t)
                  − β (1/|y⁻|) Σ_t log π_θ(y⁻_t|x, y⁻_<t)/π_ref(y⁻_t|x, y⁻_<t) ) ]

    ragseek train dpo --config configs/dpo.yaml [--set beta=0.1 --set length_normalize=false] [--out DIR] [--resume]

Data: JSONL {"prompt", "chosen", "rejected"}. The reference π_ref is `ref_model` (empty: a frozen copy of the starting
policy, taken before any resume). With `precompute_ref` its per-token logps are computed once for every pair before
training and the reference is freed (half the forward passes per step, one model in memory). One step: chosen and
rejected responses in one forward (`rollout.response_logps`), `losses.dpo_loss`. Metrics: the implicit rewards
β·log π_θ/π_ref of chosen and rejected, their margin and the share of pairs ranked right.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ragseek.config import config_field as _f
from ragseek.train.data import EpochSampler, collate_preference, load_preference
from ragseek.train.distributed import World
from ragseek.train.loop import LoopConfig, build_optimizer, set_seed, train_step
from ragseek.train.losses import dpo_loss
from ragseek.train.rollout import response_logps
from ragseek.train.run import (
    MODEL_HELP,
    RecipeConfig,
    frozen,
    load_model,
    loop_field,
    preference_micro_batches,
    recipe_main,
    start_run,
)

PLOT_KEYS = ("loss", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward", "lr")


@dataclass
class DPOConfig(RecipeConfig):
    model: str = _f("", f"the policy to train: {MODEL_HELP}")
    ref_model: str = _f("", "the frozen reference π_ref (empty: a copy of the starting policy)")
    data: str = _f("", 'JSONL preference pairs {"prompt", "chosen", "rejected"}')
    beta: float = _f(0.1, "β: the strength of the implicit KL constraint to the reference")
    length_normalize: bool = _f(
        True, "true: the lecture's (1/|y|) Σ_t log-ratio (a mean per token); false: the original DPO (sums)"
    )
    precompute_ref: bool = _f(
        False, "compute the reference logps of every pair once before training, then free it"
    )
    max_len: int = _f(512, "tokens per prompt + response (the end is cut)")
    batch_size: int = _f(8, "pairs per optimizer step")
    loop: LoopConfig = loop_field(lr=5e-7, out_dir="runs/dpo")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta}: β must be > 0 (it scales the implicit rewards)")


def pair_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token logps and masks (each (B, T-1)) of the chosen and the rejected responses, in one forward."""
    logps, mask = response_logps(model, batch)
    (chosen, rejected), (chosen_mask, rejected_mask) = logps.chunk(2), mask.chunk(2)
    return chosen, rejected, chosen_mask, rejected_mask


@torch.no_grad()
def reference_logps(reference: nn.Module, pairs: Sequence[dict], pad_id: int, batch_size: int) -> list[dict]:
    """Each pair's reference logps {"ref_chosen", "ref_rejected"} as lists (position t scores token t + 1)."""
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        chosen, rejected, _, _ = pair_logps(reference, collate_preference(chunk, pad_id))
        for j, pair in enumerate(chunk):
            out.append(
                {
                    "ref_chosen": chosen[j, : len(pair["chosen_ids"]) - 1].tolist(),
                    "ref_rejected": rejected[j, : len(pair["rejected_ids"]) - 1].tolist(),
                }
            )
    return out


def with_ref_logps(micro: dict[str, Tensor], refs: Sequence[dict]) -> dict[str, Tensor]:
    """Add the precomputed reference logps of a micro-batch's pairs, padded to its (B, T-1) layout."""
    width = micro["input_ids"].shape[1] - 1
    rows = [r["ref_chosen"] for r in refs] + [r["ref_rejected"] for r in refs]
    padded = torch.tensor([row + [0.0] * (width - len(row)) for row in rows], dtype=torch.float32)
    return {**micro, "ref_logps": padded}


def dpo_loss_fn(
    model: nn.Module, reference: nn.Module | None, cfg: DPOConfig
) -> Callable[[dict[str, Tensor]], tuple[Tensor, dict[str, float]]]:
    """The step's loss on a micro-batch: the policy's logps against the live reference's, or against the
    precomputed "ref_logps" of the micro-batch when `reference` is None."""

    def loss_fn(mb: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        chosen, rejected, chosen_mask, rejected_mask = pair_logps(model, mb)
        if reference is None:
            ref_chosen, ref_rejected = mb["ref_logps"].chunk(2)
        else:
            with torch.no_grad():
                ref_chosen, ref_rejected, _, _ = pair_logps(reference, mb)
        return dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            chosen_mask,
            rejected_mask,
            cfg.beta,
            cfg.length_normalize,
        )

    return loss_fn


def train(cfg: DPOConfig) -> list[dict]:
    """Train with DPO as configured; returns this run's metrics rows (also in `<out_dir>/metrics.jsonl`)."""
    world = World.join(cfg.loop)
    set_seed(cfg.loop.seed)
    model, tokenizer = load_model(cfg.model)
    # the reference: the starting policy (before any resume) or ref_model, frozen (a whole copy on every rank)
    reference = frozen(load_model(cfg.ref_model)[0] if cfg.ref_model else copy.deepcopy(model))
    model.train()
    pairs = load_preference(cfg.data, tokenizer, cfg.max_len)
    refs = None
    if cfg.precompute_ref:
        refs, reference = reference_logps(reference, pairs, tokenizer.pad_id, cfg.batch_size), None
    else:
        reference = world.place(reference)
    sampler = EpochSampler(len(pairs), cfg.batch_size, seed=cfg.loop.seed, world=world)
    trained = world.parallelize(model, cfg.loop)
    optimizer = build_optimizer(model, cfg.loop)
    run = start_run(cfg, cfg.loop, trained, optimizer, sampler)
    loss_fn = dpo_loss_fn(model, reference, cfg)
    for step in range(run.start, cfg.loop.max_steps):
        indices = sampler.next_batch()
        micro = preference_micro_batches([pairs[i] for i in indices], cfg.loop, tokenizer.pad_id)
        if refs is not None:
            k = len(indices) // cfg.loop.grad_accum
            micro = [
                with_ref_logps(mb, [refs[i] for i in indices[j * k : (j + 1) * k]])
                for j, mb in enumerate(micro)
            ]
        metrics = train_step(optimizer, micro, loss_fn, cfg.loop, step, trained)
        run.end_step(step + 1, metrics, sum(int(mb["attention_mask"].sum()) for mb in micro))
    return run.finish(PLOT_KEYS, model, tokenizer)


main = recipe_main(DPOConfig, train)
