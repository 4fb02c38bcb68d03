import json
import math
import random
import re
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ragseek.model.config import ModelConfig
from ragseek.model.transformer import Transformer
from ragseek.train.distributed import World
from ragseek.train.loop import (
    Checkpointer,
    LoopConfig,
    MetricsLog,
    Progress,
    accumulate_gradients,
    build_optimizer,
    format_seconds,
    lr_at,
    micro_batches,
    param_groups,
    read_metrics,
    save_config,
    set_seed,
    train_step,
)

REPO = Path(__file__).resolve().parents[2]
TOY = Path(__file__).with_name("_toy_train.py")


def tiny_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=16, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, inter_dim=32, max_seq_len=16
    )
    return Transformer(ModelConfig(**{**cfg, **kw}))


def toy_batch(n: int = 8, T: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, 16, (n, T), generator=torch.Generator().manual_seed(seed))
    return {"tokens": tokens, "loss_mask": torch.ones(n, T)}


def loss_of(model):
    return lambda batch: model.loss(batch["tokens"], batch["loss_mask"])


# --------------------------------------------------------------------------------------------------------------------
def test_lr_schedule_hand_worked():
    cfg = LoopConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    expected = {
        0: 1e-4,  # 1e-3 * 1/10
        4: 5e-4,  # 1e-3 * 5/10
        9: 1e-3,  # end of warmup
        10: 1e-3,  # cosine at p = 0
        35: 1e-4 + 9e-4 * (1 + math.sqrt(0.5)) / 2,  # p = 1/4: cos(pi/4)
        60: 5.5e-4,  # p = 1/2: halfway between 1e-3 and 1e-4
        110: 1e-4,  # p = 1: the floor
        500: 1e-4,  # past max_steps it stays at the floor
    }
    for step, lr in expected.items():
        assert lr_at(step, cfg) == pytest.approx(lr, rel=1e-12), step
    assert lr_at(0, LoopConfig(lr=2e-3, warmup_steps=0, max_steps=4)) == 2e-3
    assert lr_at(2, LoopConfig(lr=2e-3, warmup_steps=0, max_steps=4)) == pytest.approx(1e-3)


def test_param_groups_no_decay_on_norms_biases_embeddings():
    model = tiny_model(attention_bias=True)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(kept) and decayed | kept == set(names.values())
    assert "embed_tokens.weight" in kept  # tied with lm_head: listed once, not decayed
    assert all(("norm" in n or n.endswith(".bias") or n == "embed_tokens.weight") for n in kept)
    assert all(n.endswith("proj.weight") for n in decayed)
    assert any(n.endswith("q_proj.bias") for n in kept)


def test_accumulated_micro_batches_equal_one_big_batch():
    batch = toy_batch(n=8)
    big = tiny_model()
    loss, _ = loss_of(big)(batch)
    loss.backward()

    acc = tiny_model()
    metrics = accumulate_gradients(micro_batches(batch, 4), loss_of(acc))
    assert metrics["loss"] == pytest.approx(loss.item(), abs=1e-6)
    for (name, p), q in zip(big.named_parameters(), acc.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        micro_batches(batch, 3)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    batch = toy_batch()
    plain, recomputed = tiny_model(n_layers=2), tiny_model(n_layers=2)
    World().parallelize(recomputed, LoopConfig(activation_checkpointing=True))  # the loop's switch
    assert recomputed.activation_checkpointing and not plain.activation_checkpointing
    losses = [loss_of(model)(batch)[0] for model in (plain, recomputed)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():  # no graph, nothing to recompute: the plain forward
        torch.testing.assert_close(recomputed(batch["tokens"]), plain(batch["tokens"]), atol=0, rtol=0)


def test_train_step_sets_lr_clips_and_updates():
    model = tiny_model()
    cfg = LoopConfig(lr=1e-2, warmup_steps=4, max_steps=10, max_grad_norm=1e-3)
    opt = build_optimizer(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    out = train_step(opt, [toy_batch()], loss_of(model), cfg, step=1)
    assert out["lr"] == opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert out["grad_norm"] > 1e-3  # the pre-clip norm is reported
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_bf16_autocast_step_runs_on_cpu():
    model = tiny_model()
    cfg = LoopConfig(lr=1e-2, max_steps=2, dtype="bf16")
    seen = []

    def loss_fn(batch):
        logits = model(batch["tokens"])
        seen.append(logits.dtype)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["tokens"].flatten()), {}

    out = train_step(build_optimizer(model, cfg), [toy_batch()], loss_fn, cfg, step=0)
    assert seen == [torch.bfloat16] and math.isfinite(out["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="fp32"):
        LoopConfig(dtype="fp16")


# --------------------------------------------------------------------------------------------------------------------
def _draw() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_checkpoint_restores_weights_optimizer_rng_exactly(tmp_path):
    cfg = LoopConfig(lr=1e-2, max_steps=10, weight_decay=0.1, out_dir=str(tmp_path))
    set_seed(3)
    model = tiny_model(seed=1)
    opt = build_optimizer(model, cfg)
    for step in range(3):
        train_step(opt, micro_batches(toy_batch(seed=step), 2), loss_of(model), cfg, step)
    ckpt = Checkpointer(tmp_path, every=3, keep_last=2)
    path = ckpt.save(3, model, opt, {"epoch": 1, "index": 4, "seed": 0}, cfg, extra={"best": 0.5})
    assert sorted(f.name for f in path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    ]
    draws = _draw()
    train_step(opt, [toy_batch(seed=9)], loss_of(model), cfg, 3)

    set_seed(123)  # a different model, a fresh optimizer, advanced generators
    other = tiny_model(seed=2)
    other_opt = build_optimizer(other, cfg)
    _draw()
    resumed = ckpt.load(other, other_opt)
    assert (resumed.step, resumed.data, resumed.extra) == (
        3,
        {"epoch": 1, "index": 4, "seed": 0},
        {"best": 0.5},
    )
    assert LoopConfig(**resumed.config) == cfg
    assert _draw() == draws  # python random, numpy and torch continue exactly where they were
    saved = load_file(str(path / "model.safetensors"))
    assert all(torch.equal(saved[n], p) for n, p in other.state_dict().items() if n in saved)
    # the restored run takes the same next step as the original did: same weights, same moments, same step count
    train_step(other_opt, [toy_batch(seed=9)], loss_of(other), cfg, 3)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert all(
            torch.equal(opt.state[a][k], other_opt.state[b][k]) for k in ("step", "exp_avg", "exp_avg_sq")
        )
    assert other_opt.param_groups[0]["betas"] == cfg.betas


def test_checkpointer_keeps_last_k_and_ignores_partial_saves(tmp_path):
    model = tiny_model()
    cfg = LoopConfig(max_steps=10)
    opt = build_optimizer(model, cfg)
    ckpt = Checkpointer(tmp_path, every=2, keep_last=2)
    assert [ckpt.due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    for step in (2, 4, 6):
        ckpt.save(step, model, opt, {}, cfg)
    assert [p.name for p in ckpt.all()] == ["step_000004", "step_000006"]
    (ckpt.root / ".tmp_step_000008_999").mkdir()  # what a kill during a save leaves behind
    assert ckpt.latest().name == "step_000006"
    ckpt.save(6, model, opt, {}, cfg)  # re-saving a step replaces it; the partial save is cleared
    assert sorted(p.name for p in ckpt.root.iterdir()) == ["step_000004", "step_000006"]
    with pytest.raises(FileNotFoundError, match="without --resume"):
        Checkpointer(tmp_path / "empty", every=1).load(model, opt)


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# how a checkpoint's files get damaged after its atomic save: a disk that filled, a copy that stopped, a hand edit
DAMAGE = {
    "model.safetensors cut": lambda ck: _cut(ck / "model.safetensors"),
    "optimizer.safetensors cut": lambda ck: _cut(ck / "optimizer.safetensors"),
    "rng.safetensors missing": lambda ck: (ck / "rng.safetensors").unlink(),
    "optimizer.json torn": lambda ck: _cut(ck / "optimizer.json"),
    "state.json torn": lambda ck: _cut(ck / "state.json"),
    "state.json of another step": lambda ck: (ck / "state.json").write_text(
        (ck / "state.json").read_text().replace('"step": 4', '"step": 2')
    ),
    "state.json without its rng": lambda ck: (ck / "state.json").write_text(
        json.dumps({k: v for k, v in json.loads((ck / "state.json").read_text()).items() if k != "rng"})
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(tmp_path, capsys, damage):
    from ragseek.errors import FileError
    from ragseek.train.distributed import World
    from ragseek.train.run import start_run

    cfg = LoopConfig(lr=1e-2, max_steps=10, out_dir=str(tmp_path), resume=True)
    model = tiny_model(seed=1)
    opt = build_optimizer(model, cfg)
    ckpt = Checkpointer(tmp_path, every=2, keep_last=2)
    for step in range(4):
        train_step(opt, micro_batches(toy_batch(seed=step), 2), loss_of(model), cfg, step)
        if ckpt.due(step + 1):
            ckpt.save(step + 1, model, opt, {"index": step + 1}, cfg)
    older, newest = ckpt.all()
    DAMAGE[damage](newest)

    other = tiny_model(seed=2)
    other_opt = build_optimizer(other, cfg)
    resumed = ckpt.load(other, other_opt)
    assert (resumed.path, resumed.step, resumed.data) == (older, 2, {"index": 2})
    (problem,) = resumed.skipped
    assert problem.startswith(str(newest / damage.split()[0])), problem
    saved = load_file(str(older / "model.safetensors"))
    assert all(torch.equal(saved[n], p) for n, p in other.state_dict().items() if n in saved)
    assert all(other_opt.state[p]["step"] == 2 for p in other.parameters())

    # a run says so: which checkpoint it skipped and why, then where it resumed
    model = tiny_model(seed=3)
    start_run(cfg, cfg, World().parallelize(model, cfg), build_optimizer(model, cfg))
    out = capsys.readouterr()
    assert f"warning: skipped a damaged checkpoint: {problem}" in out.err
    assert f"resumed from {older} at step 2" in out.out

    # every checkpoint damaged: one error naming each, nothing resumed
    _cut(older / "state.json")
    with pytest.raises(FileError, match="no intact checkpoint") as e:
        ckpt.load(other, other_opt)
    assert str(older) in str(e.value) and str(newest) in str(e.value) and "\n" not in str(e.value)


def test_metrics_log_resume_drops_rows_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.log(step, {"loss": torch.tensor(1.0 / step), "lr": 0.1})
    log.close()
    with path.open("a") as f:
        f.write('{"step": 6, "lo')  # torn line from a kill mid-write
    log = MetricsLog(path, resume_step=3)
    log.log(4, {"loss": 9.0})
    log.close()
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["loss"] == pytest.approx(1 / 3) and rows[3]["loss"] == 9.0
    assert [r["step"] for r in read_metrics(MetricsLog(path).path)] == []  # a fresh run starts a new file


def test_progress_line_and_config(tmp_path):
    progress = Progress(max_steps=100)
    progress.update(1000)
    line = progress.line(42, {"loss": 2.34561, "lr": 3e-4, "grad_norm": 0.5})
    assert re.fullmatch(
        r"step 00042/00100 \| loss 2\.3456 \| lr 3\.00e-04 \| tok/s [\d,]+ \| eta \S+ \| grad_norm 0\.5", line
    ), line
    assert [format_seconds(s) for s in (5, 185, 3720)] == ["5s", "3m05s", "1h02m"]
    cfg = LoopConfig(lr=0.5, betas=[0.8, 0.9], out_dir="x")
    saved = json.loads(save_config(cfg, tmp_path / "config.json").read_text())
    assert (
        saved == {**asdict(cfg), "betas": [0.8, 0.9]}
        and LoopConfig(**saved) == cfg
        and cfg.betas == (0.8, 0.9)
    )


# --------------------------------------------------------------------------------------------------------------------
def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOY), "--out", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )


def test_kill_9_then_resume_continues_the_same_curve(tmp_path):
    """A real run killed with SIGKILL 3 steps after its step-10 checkpoint, resumed, matches an uninterrupted run."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    victim = subprocess.Popen(
        [sys.executable, str(TOY), "--out", str(killed), "--pause-after", "13"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    _run(full)  # runs while the victim trains
    for line in victim.stdout:
        if line.strip() == "paused":
            victim.send_signal(signal.SIGKILL)
            break
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert [r["step"] for r in read_metrics(killed / "metrics.jsonl")] == list(range(1, 14))
    assert Checkpointer(killed, 10).latest().name == "step_000010"

    resumed = _run(killed, "--resume")
    assert "at step 10" in resumed.stdout
    want, got = read_metrics(full / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 31))  # no duplicate or missing steps
    keys = ("loss", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in want]  # bitwise equal floats
    final_a = load_file(str(full / "checkpoints/step_000030/model.safetensors"))
    final_b = load_file(str(killed / "checkpoints/step_000030/model.safetensors"))
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    losses = [r["loss"] for r in want]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # it learns the toy set
    assert (killed / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_config_types_yaml_scalars_and_merges_the_loop_block(tmp_path):
    from ragseek.config import load_config
    from ragseek.train.recipes.pretrain import PretrainConfig
    from ragseek.train.recipes.sft import SFTConfig

    path = tmp_path / "c.json"  # a saved config.json: YAML 1.1 reads 1e-05 as a string
    path.write_text(json.dumps({"data": "x.jsonl", "loop": {"lr": 1e-05, "max_steps": 7}}))
    cfg = load_config(SFTConfig, path, ["loop.weight_decay=1e-2"])
    assert (cfg.loop.lr, cfg.loop.max_steps, cfg.loop.weight_decay) == (1e-05, 7, 0.01)
    assert isinstance(cfg.loop.lr, float)
    assert cfg.loop.out_dir == "runs/sft"  # a loop block keeps the recipe's other loop defaults
    with pytest.raises(ValueError, match=r"unknown LoopConfig keys \['lrr'\]"):
        load_config(PretrainConfig, None, ["loop.lrr=1"])
    with pytest.raises(ValueError, match="must be a number"):
        load_config(PretrainConfig, None, ["loop.lr=fast"])
    # a bad file or override: one line naming it
    (tmp_path / "list.yaml").write_text("- lr: 1\n")
    (tmp_path / "broken.yaml").write_text("loop: {lr: 1\n")
    for path, sets, says in (
        (tmp_path / "list.yaml", [], "list.yaml: a config file is a YAML mapping"),
        (tmp_path / "broken.yaml", [], "broken.yaml: not valid YAML"),
        (tmp_path / "missing.yaml", [], "missing.yaml: cannot read the config file"),
        (None, ["loop.lr"], "write key=value"),
        (None, ["data=x", "data.lr=1"], "data is a value, not a block"),
    ):
        with pytest.raises(ValueError, match=says):
            load_config(SFTConfig, path, sets)
