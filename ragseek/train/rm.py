"""`python -m ragseek.train.rm ...`, and on every rank of `torchrun --nproc-per-node N -m ragseek.train.rm ...`,
is `ragseek train rm ...`; the recipe is `recipes/rm.py`."""

from ragseek.train.cli import run_module

if __name__ == "__main__":
    run_module(__spec__.name)
