"""Post-training: losses, rule-based rewards, tasks and one recipe per method (SFT, distillation, RM, DPO, PPO, GRPO)."""
