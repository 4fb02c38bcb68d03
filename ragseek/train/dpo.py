"""`python -m ragseek.train.dpo ...`, and on every rank of `torchrun --nproc-per-node N -m ragseek.train.dpo ...`,
is `ragseek train dpo ...`; the recipe is `recipes/dpo.py`."""

from ragseek.train.cli import run_module

if __name__ == "__main__":
    run_module(__spec__.name)
