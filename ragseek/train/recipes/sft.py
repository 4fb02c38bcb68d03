"""Supervised fine-tuning: the lecture's L(θ) = −E_{(x,y)~D} [ (1/|y|) Σ_t log π_θ(y_t | x, y_<t) ].

    ragseek train sft --config configs/sft.yaml [--set loop.max_steps=50 --set batch_size=8] [--out DIR] [--resume]
    torchrun --nproc-per-node 4 -m ragseek.train.sft --config configs/sft.yaml [--set loop.parallel=fsdp]

Data: JSONL {"prompt", "response"} or {"messages": [...]}, rendered with the model's chat template; only the assistant
tokens (and their end-of-turn token) are trained (`data.tokenize_chat`). One step: a batch from the resumable
sampler, the hidden states of prompt + response, the head and `sft_loss` on the response tokens (in chunks), AdamW with the loop's schedule.
The run writes metrics.jsonl, metrics.png, config.json, checkpoints/ and the trained model (with its tokenizer)
to `<out_dir>/final`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ragseek.config import config_field as _f
from ragseek.model.lora import LoRAConfig
from ragseek.model.transformer import Transformer
from ragseek.train.data import EpochSampler, collate_sft, load_sft
from ragseek.train.distributed import World
from ragseek.train.loop import LoopConfig, build_optimizer, micro_batches, set_seed, train_step
from ragseek.train.losses import SFTReduction, chunked_token_logps, sft_loss, sft_loss_from_logps
from ragseek.train.run import (
    LORA_HELP,
    MODEL_HELP,
    RecipeConfig,
    load_model,
    loop_field,
    recipe_main,
    start_run,
)

PLOT_KEYS = ("loss", "lr", "grad_norm")


@dataclass
class SFTConfig(RecipeConfig):
    model: str = _f("", f"the model to fine-tune: {MODEL_HELP}")
    data: str = _f("", 'JSONL rows {"prompt", "response"} or {"messages": [{"role", "content"}, ...]}')
    max_len: int = _f(512, "tokens per example (the end is cut); with pack, tokens per packed row")
    pack: bool = _f(
        False,
        "concatenate whole examples into rows of at most max_len tokens (less padding); each example keeps its own "
        "positions and attends only to itself, as unpacked",
    )
    batch_size: int = _f(
        8, "examples (or packed rows) per optimizer step, split into loop.grad_accum micro-batches"
    )
    reduction: SFTReduction = _f(
        "sequence",
        "sequence: the lecture's per-response mean (each packed example its own), then the batch mean; token: one "
        "mean over all tokens",
    )
    head_chunk: int = _f(
        256,
        "the LM head and loss run over the response positions only, this many at a time, so the (tokens x vocab) "
        "logits never exist whole (losses.chunked_token_logps); 0: one logits tensor from the first response position",
    )
    lora: LoRAConfig | None = _f(None, LORA_HELP)
    loop: LoopConfig = loop_field(lr=2e-5, out_dir="runs/sft")


def batch_loss(
    model: Transformer, batch: dict[str, Tensor], reduction: SFTReduction, head_chunk: int
) -> tuple[Tensor, dict[str, float]]:
    """`sft_loss` of a collated batch (`collate_sft`), the head run as `SFTConfig.head_chunk` says; a packed batch's
    "segments" keep its examples apart in the model and in the sequence mean."""
    ids, mask, segments = batch["input_ids"], batch["loss_mask"][:, 1:], batch.get("segments")
    h, _, _ = model.hidden_states(ids, attention_mask=batch["attention_mask"], segments=segments)
    # each target's example id
    targets_segments = None if segments is None else segments[:, 1:]
    if head_chunk:
        keep = mask.bool()
        kept = chunked_token_logps(
            model.norm(h[:, :-1][keep]), model.lm_head.weight, ids[:, 1:][keep], head_chunk
        )
        return sft_loss_from_logps(
            kept.new_zeros(mask.shape).index_put((keep,), kept), mask, reduction, targets_segments
        )
    # the head (49k columns for SmolLM2) runs from the first position that scores a response token on: in a
    # RAG example the prompt is most of the row, and masked positions add nothing to the loss
    p0 = int(mask.any(0).int().argmax())
    logits = model.lm_head(model.norm(h[:, p0:-1]))
    return sft_loss(
        logits,
        ids[:, 1 + p0 :],
        mask[:, p0:],
        reduction,
        None if targets_segments is None else targets_segments[:, p0:],
    )


def train(cfg: SFTConfig) -> list[dict]:
    """Fine-tune as configured; returns this run's metrics rows (also in `<out_dir>/metrics.jsonl`)."""
    world = World.join(cfg.loop)
    set_seed(cfg.loop.seed)
    model, tokenizer = load_model(cfg.model, cfg.lora)
    model.train()
    examples = load_sft(cfg.data, tokenizer, cfg.max_len, cfg.pack)
    # batch_size is global: under torchrun each rank gets its share of every batch
    sampler = EpochSampler(len(examples), cfg.batch_size, seed=cfg.loop.seed, world=world)
    trained = world.parallelize(model, cfg.loop)
    optimizer = build_optimizer(model, cfg.loop)
    run = start_run(cfg, cfg.loop, trained, optimizer, sampler)

    def loss_fn(batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return batch_loss(model, batch, cfg.reduction, cfg.head_chunk)

    for step in range(run.start, cfg.loop.max_steps):
        batch = collate_sft([examples[i] for i in sampler.next_batch()], tokenizer.pad_id)
        micro = micro_batches(batch, cfg.loop.grad_accum)
        metrics = train_step(optimizer, micro, loss_fn, cfg.loop, step, trained)
        run.end_step(step + 1, metrics, int(batch["attention_mask"].sum()))
    return run.finish(PLOT_KEYS, model, tokenizer)


main = recipe_main(SFTConfig, train)
