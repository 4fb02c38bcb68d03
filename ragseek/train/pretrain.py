"""`python -m ragseek.train.pretrain ...`, and on every rank of `torchrun --nproc-per-node N -m ragseek.train.pretrain ...`,
is `ragseek train pretrain ...`; the recipe is `recipes/pretrain.py`."""

from ragseek.train.cli import run_module

if __name__ == "__main__":
    run_module(__spec__.name)
