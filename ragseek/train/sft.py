"""`python -m ragseek.train.sft ...`, and on every rank of `torchrun --nproc-per-node N -m ragseek.train.sft ...`,
is `ragseek train sft ...`; the recipe is `recipes/sft.py`."""

from ragseek.train.cli import run_module

if __name__ == "__main__":
    run_module(__spec__.name)
