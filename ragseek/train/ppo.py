"""`python -m ragseek.train.ppo ...`, and on every rank of `torchrun --nproc-per-node N -m ragseek.train.ppo ...`,
is `ragseek train ppo ...`; the recipe is `recipes/ppo.py`."""

from ragseek.train.cli import run_module

if __name__ == "__main__":
    run_module(__spec__.name)
