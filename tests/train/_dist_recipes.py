"""Several recipe runs one after another on every rank of one torchrun launch (the process group is joined once, by
the first run, and reused), so that the distributed tests pay for one launch:

    python -m torch.distributed.run --nproc-per-node 2 --master-port PORT tests/train/_dist_recipes.py RUNS.json

RUNS.json: [{"recipe": "sft", "config": "a.yaml", "set": ["loop.parallel=fsdp"], "out": "runs/x"}, ...]; each run
is what `ragseek train RECIPE --config CONFIG --set ... --out OUT` runs.
"""

from __future__ import annotations

import importlib
import json
import sys

import torch

if __name__ == "__main__":
    torch.set_num_threads(1)
    for run in json.loads(open(sys.argv[1]).read()):
        recipe = importlib.import_module(f"ragseek.train.recipes.{run['recipe']}")
        recipe.main(run["config"], run["set"], run["out"])
