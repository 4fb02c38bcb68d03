"""Post-training (and pretraining): components, then one recipe per method that uses them (torchtune's split).

Components: `losses` (every loss, a pure function of tensors), `rewards` (rule-based rewards, by name),
`rollout` (sampling groups, logprobs, scoring), `value_heads` (reward model, critic), `loop` (optimiser, schedule,
checkpoints, metrics), `run` (the recipe configs' base, config loading and the run around a recipe's loop),
`distributed` (torchrun: ranks, DDP / FSDP2, data shares, full-state checkpoints), `data` and `corpus` (datasets,
pretraining token files), `tasks/` (the addition task, maths evaluation, the reader's SQuAD data); LoRA is the
model's (`ragseek.model.lora`). Recipes: `recipes/` pretrain, sft, distill, rm, dpo, ppo, grpo, one file each,
importing components only. `cli` is `ragseek train`, `ragseek data` and `ragseek eval math`;
`python -m ragseek.train.NAME` (`NAME.py` here, so `torchrun -m` finds them) is `ragseek train NAME`.
"""
