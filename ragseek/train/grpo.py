"""`python -m ragseek.train.grpo ...`, and on every rank of `torchrun --nproc-per-node N -m ragseek.train.grpo ...`,
is `ragseek train grpo ...`; the recipe is `recipes/grpo.py`."""

from ragseek.train.cli import run_module

if __name__ == "__main__":
    run_module(__spec__.name)
