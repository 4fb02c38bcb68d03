"""`python -m ragseek.train.distill ...`, and on every rank of `torchrun --nproc-per-node N -m ragseek.train.distill ...`,
is `ragseek train distill ...`; the recipe is `recipes/distill.py`."""

from ragseek.train.cli import run_module

if __name__ == "__main__":
    run_module(__spec__.name)
