"""Every recipe under torchrun (gloo, 2 processes on this CPU, tiny models) against the same recipe in one process.

The 2-rank runs: one torchrun launch runs all seven recipes under DDP and under FSDP2 (`_dist_recipes.py`), each
with a global batch that splits over the ranks, grad_accum where it splits further, and checkpoints; every loss
curve must be the one-process curve (≤ 1e-5, fp32). A 2-rank checkpoint resumes in one process and continues the
curve; `torchrun -m ragseek.train.sft` with rank 1 killed by SIGKILL, then `--resume`, continues it too. A rank
that cannot meet the others, or a batch that does not split, stops with a line naming the flag.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_model
from test_pretrain import write_corpus
from test_rl import prompts_file, tiny_model_dir

from ragseek.model import ModelConfig, Transformer
from ragseek.train.data import EpochSampler
from ragseek.train.distributed import World, full_state, load_full_state
from ragseek.train.loop import read_metrics
from ragseek.train.recipes import distill, dpo, grpo, ppo, pretrain, rm, sft

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
RECIPES = {
    "pretrain": pretrain,
    "sft": sft,
    "distill": distill,
    "rm": rm,
    "dpo": dpo,
    "ppo": ppo,
    "grpo": grpo,
}
PARALLEL = ("ddp", "fsdp")
# besides the loss, what must match: the whole batch's statistics (GRPO's and PPO's rewards are all-gathered; a
# token mean such as GRPO's kl is each rank's, averaged, so it is close to the one-process value, not equal); the
# evaluations, which the ranks split (3 or 5 items over 2 ranks: one is padded)
ALSO = {
    "pretrain": ("val_loss", "val_loss_mtp"),
    "grpo": ("reward_mean", "reward_std", "eval_accuracy"),
    "ppo": ("score_mean", "score_std"),
    "rm": ("eval_accuracy", "eval_margin", "eval_loss"),
}
# runs beside the fp32 ones: LoRA (frozen weights in FSDP's groups), bf16 (DDP: autocast as in one process; FSDP:
# MixedPrecisionPolicy gathers bf16 weights)
VARIANTS = {"": [], "lora": ["lora.r=4", "lora.alpha=8", "lora.dropout=0"], "bf16": ["loop.dtype=bf16"]}
EXTRA_RUNS = [
    ("sft", "fsdp", "lora"),
    ("sft", "ddp", "bf16"),
    ("sft", "fsdp", "bf16"),
    ("grpo", "fsdp", "bf16"),
]
PAIRS = [(12, 19), (33, 41), (50, 25), (71, 18), (5, 6), (7, 8), (9, 10), (11, 3)]

pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    """The tests' environment for a launched process: the repo and this folder (test_rl's reward) importable."""
    path = os.pathsep.join([str(REPO), str(HERE)])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(*args: str, **kw) -> subprocess.Popen:
    """`torchrun --nproc-per-node 2` on a free port (torch.distributed.run is what the torchrun script runs)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(free_port()), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), text=True, **kw)


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def configs(tmp_path_factory, make_tiny_llm) -> dict[str, str]:
    """One YAML config per recipe: tiny models, a global batch of 2 or 4, 3-6 steps, a checkpoint every 2."""
    root = tmp_path_factory.mktemp("dist")
    llm = make_tiny_llm("dist_llm", 128)
    torch.manual_seed(1)
    teacher = root / "teacher"
    tiny = ModelConfig(
        vocab_size=49152, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, inter_dim=64
    )
    Transformer(tiny).save_pretrained(teacher)
    shutil.copy(llm / "tokenizer.json", teacher)
    shutil.copy(llm / "tokenizer_config.json", teacher)
    rows = [{"prompt": f"What is {a} + {b}?", "response": str(a + b)} for a, b in PAIRS]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [
        {"prompt": f"What is {a} + {b}?", "chosen": f"{a + b}.", "rejected": f"{a + b + 1}!"}
        for a, b in PAIRS
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    write_corpus(root / "corpus")
    rl_model, prompts = tiny_model_dir(root / "rl_model"), prompts_file(root / "prompts.jsonl")
    evals = [{"question": q, "answer": a} for q, a in [("a b", "1"), ("c d", "2"), ("What is 1 + 2", "3")]]
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))

    def loop(**kw) -> dict:
        return {"lr": 1e-2, "max_steps": 4, "ckpt_every": 2, "keep_last": 2, "seed": 0, **kw}

    moe = dict(n_dense_layers=1, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=16, mtp_depth=1)
    rl = dict(model=str(rl_model), data=str(prompts), rewards=["test_rl:share_of_a"], max_new_tokens=8)
    settings = {
        # SFT: 2 micro-batches per rank (DDP syncs only on the last)
        "sft": dict(model=str(llm), data=str(root / "sft.jsonl"), max_len=64, batch_size=4,
                    loop=loop(max_steps=6, grad_accum=2)),
        # an MoE with MTP from scratch: expert loads all-reduced for the bias update
        "pretrain": dict(model=dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, inter_dim=64,
                                    max_seq_len=64, **moe),
                         data=[str(root / "corpus")], vocab_size=300, seq_len=32, batch_size=4, val_fraction=0.1,
                         val_windows=5, loop=loop(eval_every=2)),
        "distill": dict(kind="logit", teacher=str(teacher), student=str(llm), data=str(root / "sft.jsonl"),
                        max_len=64, batch_size=4, loop=loop()),
        "rm": dict(model=str(llm), data=str(root / "pairs.jsonl"), eval_fraction=0.375, max_len=64, batch_size=2,
                   loop=loop()),
        "dpo": dict(model=str(llm), data=str(root / "pairs.jsonl"), max_len=64, batch_size=4, loop=loop()),
        # μ = 2 and β > 0: old logps from the policy, reference logps, the clipped ratio
        "grpo": dict(**rl, group_size=4, prompts_per_step=2, mu=2, beta=0.04, eval_data=str(root / "eval.jsonl"),
                     loop=loop(lr=3e-2, eval_every=2)),
        "ppo": dict(**rl, samples_per_prompt=2, prompts_per_step=2, ppo_epochs=2, loop=loop(lr=3e-2)),
    }  # fmt: skip
    return {name: write_yaml(root / f"{name}.yaml", data) for name, data in settings.items()}


def one_process_flags(config: str, variant: str = "") -> list[str]:
    """--set items of a one-process reference: the variant's, and the ranks' micro-batches (grad_accum x 2): the
    same global batch and gradient, and fp32 rounding as close as it gets."""
    accum = yaml.safe_load(Path(config).read_text())["loop"].get("grad_accum", 1)
    return [*VARIANTS[variant], f"loop.grad_accum={2 * accum}"]


@pytest.fixture(scope="module")
def one_process(configs, tmp_path_factory):
    """(recipe, variant) -> its metrics rows run in this process (computed once, on first use)."""
    root, done = tmp_path_factory.mktemp("one"), {}

    def rows(recipe: str, variant: str = "") -> list[dict]:
        out = root / f"{recipe}{variant}"
        if out not in done:
            RECIPES[recipe].main(configs[recipe], one_process_flags(configs[recipe], variant), str(out))
            done[out] = read_metrics(out / "metrics.jsonl")
        return done[out]

    return rows


@pytest.fixture(scope="module")
def two_ranks(configs, tmp_path_factory) -> Path:
    """Every recipe under DDP and under FSDP2, and the EXTRA_RUNS, in one 2-rank torchrun launch:
    <root>/<recipe>_<parallel>[_<variant>]."""
    root = tmp_path_factory.mktemp("two")
    runs = [
        {
            "recipe": recipe,
            "config": configs[recipe],
            "set": [f"loop.parallel={p}", *VARIANTS[variant]],
            "out": str(root / "_".join(filter(None, (recipe, p, variant)))),
        }
        for recipe, p, variant in [(r, p, "") for r in RECIPES for p in PARALLEL] + EXTRA_RUNS
    ]
    (root / "runs.json").write_text(json.dumps(runs))
    proc = torchrun(str(HERE / "_dist_recipes.py"), str(root / "runs.json"), stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT)  # fmt: skip
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-6000:]
    return root


def assert_same_curve(got: list[dict], want: list[dict], keys: tuple[str, ...] = ("loss",)) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for key in (k for k in keys if k in w):
            assert g[key] == pytest.approx(w[key], abs=1e-5), (g["step"], key, g[key], w[key])


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_two_ranks_give_the_one_process_loss_curve(recipe, parallel, two_ranks, one_process):
    out = two_ranks / f"{recipe}_{parallel}"
    rows = read_metrics(out / "metrics.jsonl")
    assert_same_curve(rows, one_process(recipe), ("loss", *ALSO.get(recipe, ())))
    # tokens summed over the ranks
    assert [r.get("seq_tokens") for r in rows] == [r.get("seq_tokens") for r in one_process(recipe)]
    # rank 0 alone wrote: one row per step, the checkpoints, the final model
    saved = [f"step_{s:06d}" for s in range(2, len(rows) + 1, 2)][-2:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == saved
    final = out / ("model" if recipe == "pretrain" else "final")
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()


def test_lora_under_fsdp_gives_the_one_process_curve_and_an_adapter(two_ranks, one_process):
    """LoRA: FSDP shards frozen base weights with the trained A, B in the same groups; the final is the adapter."""
    out = two_ranks / "sft_fsdp_lora"
    assert_same_curve(read_metrics(out / "metrics.jsonl"), one_process("sft", "lora"))
    assert sorted(p.name for p in (out / "final").glob("adapter_*")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


@pytest.mark.parametrize(("recipe", "parallel"), [("sft", "ddp"), ("sft", "fsdp"), ("grpo", "fsdp")])
def test_bf16_on_two_ranks(recipe, parallel, two_ranks, one_process):
    """loop.dtype=bf16. DDP autocasts as one process does: the same first loss (later ones part by bf16's
    rounding, amplified: 1e-2 after 6 steps here). FSDP gathers bf16 weights (MixedPrecisionPolicy, half the
    traffic), so norms and embeddings run on bf16 weights that one process keeps in fp32: its first loss is one
    process's within 1%. Both train and save."""
    rows = read_metrics(two_ranks / f"{recipe}_{parallel}_bf16" / "metrics.jsonl")
    want = one_process(recipe, "bf16")
    assert [r["step"] for r in rows] == [r["step"] for r in want]
    if parallel == "ddp":
        assert rows[0]["loss"] == pytest.approx(want[0]["loss"], abs=1e-5)
    assert rows[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-2, abs=1e-2)
    if recipe == "sft":
        assert rows[-1]["loss"] < rows[0]["loss"] - 1
    assert (two_ranks / f"{recipe}_{parallel}_bf16" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(("recipe", "parallel"), [("sft", "fsdp"), ("grpo", "ddp"), ("ppo", "fsdp")])
def test_a_two_rank_checkpoint_resumes_on_one_process(
    recipe, parallel, two_ranks, one_process, configs, tmp_path
):
    """The 2-rank run's last checkpoint removed, its run resumed here (one process) from the one before: the
    resumed steps are the uninterrupted curve (sampled completions included, for GRPO)."""
    out = tmp_path / "run"
    shutil.copytree(two_ranks / f"{recipe}_{parallel}", out)
    *_, before, last = sorted((out / "checkpoints").iterdir())
    shutil.rmtree(last)
    resumed = RECIPES[recipe].main(configs[recipe], one_process_flags(configs[recipe]), str(out), True)
    start = int(before.name.removeprefix("step_"))
    assert_same_curve(resumed, one_process(recipe)[start:], ("loss", *ALSO.get(recipe, ())))
    assert_same_curve(read_metrics(out / "metrics.jsonl"), one_process(recipe))


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the worker of `launcher` (torchrun) whose RANK is `rank`."""
    deadline = time.time() + 120
    while time.time() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if ppid == launcher.pid and f"RANK={rank}".encode() in environ:
                return int(proc.name)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under torchrun (pid {launcher.pid})")


def test_killing_rank_1_then_resume_continues_the_curve(configs, tmp_path):
    """`torchrun -m ragseek.train.sft` on 2 ranks, rank 1 SIGKILLed between checkpoints: torchrun stops rank 0 and
    fails; the same command with --resume continues from the last checkpoint: the steps it runs again are the killed
    run's, to the last digit, and the curve goes on to the end. (Not compared with one process over 60 steps: at
    lr 1e-2 this memorising run grows fp32 rounding to 1e-2, as two one-process runs with grad_accum 2 and 4 do.)"""
    steps = ["--set", "loop.max_steps=60", "--set", "loop.ckpt_every=5"]
    command = ["-m", "ragseek.train.sft", "--config", configs["sft"], *steps, "--out", str(tmp_path / "run")]
    launcher = torchrun(*command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "run" / "metrics.jsonl"
    rank1 = rank_pid(launcher, 1)
    deadline = time.time() + 300
    # past a checkpoint, so that the resumed run computes some steps again
    while time.time() < deadline and not any(
        r["step"] >= 12 and r["step"] % 5 for r in read_metrics(metrics)
    ):
        time.sleep(0.01)
    os.kill(rank1, signal.SIGKILL)
    assert launcher.wait(timeout=300) != 0, "torchrun ended well: rank 1 was not killed in time"
    killed = read_metrics(metrics)
    assert 12 <= killed[-1]["step"] < 60, "the run was not killed mid-way"

    resumed = torchrun(*command, "--resume", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-4000:]
    start = int(out.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert start < killed[-1]["step"] and start % 5 == 0
    rows = read_metrics(metrics)
    assert_same_curve(rows[start : len(killed)], killed[start:], ("loss", "grad_norm", "seq_tokens"))
    assert [r["step"] for r in rows] == list(range(1, 61))


# ---------------------------------------------------------------------------------------------------------------------
# the pieces


def test_the_sampler_gives_each_rank_its_share_of_the_global_batch():
    one = EpochSampler(10, 6, seed=3)
    ranks = [EpochSampler(10, 6, seed=3, world=World(rank=r, size=3)) for r in range(3)]
    for _ in range(5):  # across epochs (the tail of 4 is skipped)
        assert sum((s.next_batch() for s in ranks), []) == one.next_batch()
    assert {str(s.state_dict()) for s in ranks} == {str(one.state_dict())}
    with pytest.raises(ValueError, match=r"does not split evenly over 4 ranks.*--nproc-per-node"):
        EpochSampler(10, 6, world=World(rank=0, size=4))


def test_the_ranks_split_an_evaluation_into_equal_parts_that_gather_back_in_order():
    for n in range(1, 8):
        items = [f"item {i}" for i in range(n)]
        for size in (1, 2, 3, 4):
            shares = [World(rank=r, size=size).eval_share(items) for r in range(size)]
            assert len({len(part) for part, _ in shares}) == 1, (n, size)  # as many batches on every rank
            gathered = sum((part for part, _ in shares), [])
            assert gathered[:n] == items and set(gathered[n:]) <= {items[-1]}, (n, size)
            assert sum((part[:real] for part, real in shares), []) == items, (n, size)


def test_full_state_is_the_single_process_checkpoint_layout(tmp_path):
    """Tied weights stored once under safetensors' name, the other named in the metadata; loaded back (into a
    model whose head is tied, or untied with the aliases) every weight is the same."""
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, inter_dim=64,
                      tie_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    tensors, aliases = full_state(model)
    save_model(model, str(tmp_path / "ref.safetensors"))
    assert sorted(tensors) == sorted(load_file(str(tmp_path / "ref.safetensors")))
    assert aliases == {"lm_head.weight": "embed_tokens.weight"}
    torch.manual_seed(1)
    other = Transformer(cfg)
    load_full_state(other, tensors)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    )
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_full_state(Transformer(ModelConfig(**{**cfg.__dict__, "dim": 16, "head_dim": 4})), tensors)


def test_recipe_modules_are_the_train_commands():
    for name in RECIPES:
        out = subprocess.run([sys.executable, "-m", f"ragseek.train.{name}", "--help"], env=env(), cwd=REPO,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert f"ragseek train {name}" in out and "--resume" in out


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({}, "MASTER_ADDR expected"),
        ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "free"}, "1/2 clients joined"),
    ],
)
def test_a_rank_that_cannot_meet_the_others_names_the_flags(extra, why, configs, tmp_path):
    """WORLD_SIZE=2 without torchrun: no rendezvous address, or nobody else comes within loop.dist_timeout: torch's
    error and a line of ours naming torchrun's flags, exit 2, nothing trained."""
    extra = {k: str(free_port()) if v == "free" else v for k, v in extra.items()}
    command = [
        sys.executable,
        "-m",
        "ragseek.train.sft",
        "--config",
        configs["sft"],
        "--set",
        "loop.dist_timeout=2",
    ]
    proc = subprocess.run([*command, "--out", str(tmp_path)], env={**env(), "WORLD_SIZE": "2", "RANK": "0",
                          "LOCAL_RANK": "0", **extra}, cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    first, second = proc.stderr.strip().splitlines()[-2:]
    assert first.startswith("error: rank 0 of WORLD_SIZE=2 could not join the others") and why in first
    assert "--nnodes, --nproc-per-node and --master-addr/--master-port" in second
    assert "loop.dist_timeout=2 s" in second
    assert not (tmp_path / "metrics.jsonl").exists()
