"""Pretraining recipe: memmap tokenisation, loss going down, MoE balancing, kill -9 + --resume.

All on text generated here (a few KB), a byte-level BPE of 300 tokens and 1-2 layer models of width 32.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ragseek.train.corpus import (
    load_split,
    open_tokens,
    read_documents,
    tokenize_to_memmap,
    train_bpe,
)
from ragseek.train.loop import LoopConfig, read_metrics
from ragseek.train.recipes.pretrain import PretrainConfig, build_model, prepare_data, train

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the cell protein gene mouse study shows that a of in and patients with increased risk number apples".split()


def write_corpus(folder: Path, n_docs: int = 40, words: int = 120) -> list[str]:
    """Half the documents as .txt files, half as JSONL rows with title + text; returns the expected texts."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    texts, rows = [], []
    for i in range(n_docs):
        body = " ".join(rng.choice(WORDS) for _ in range(words)) + "."
        if i < n_docs // 2:
            (folder / f"doc_{i:02d}.txt").write_text(body)
            texts.append(body)
        else:
            rows.append({"_id": str(i), "title": f"Title {i}", "text": body})
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return texts + [f"{r['title']}\n{r['text']}" for r in rows]  # sorted order: doc_*.txt before rows.jsonl


def tiny_config(tmp_path: Path, run: str = "run", **overrides) -> PretrainConfig:
    model = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, inter_dim=64, max_seq_len=64)
    model.update(overrides.pop("model", {}))
    loop = dict(lr=1e-2, warmup_steps=2, max_steps=30, log_every=1, eval_every=10, ckpt_every=0, seed=0)
    loop.update(overrides.pop("loop", {}))
    loop["out_dir"] = str(tmp_path / run)
    return PretrainConfig(
        model=model,
        data=[str(tmp_path / "corpus")],
        data_dir=str(tmp_path / "data"),
        vocab_size=300,
        seq_len=32,
        batch_size=4,
        val_fraction=0.1,
        val_windows=4,
        num_threads=1,
        loop=LoopConfig(**loop),
        **overrides,
    )


@pytest.fixture
def corpus(tmp_path: Path) -> list[str]:
    return write_corpus(tmp_path / "corpus")


def test_memmap_tokenisation_round_trips(tmp_path: Path, corpus: list[str]) -> None:
    docs = list(read_documents([tmp_path / "corpus"]))
    assert docs == corpus  # .txt whole, JSONL title + "\n" + text
    tok = train_bpe(docs, vocab_size=300)
    assert tok.vocab_size == 300
    split = tokenize_to_memmap(docs, tok, tmp_path / "data", val_fraction=0.1)
    assert load_split(tmp_path / "data").meta == split.meta
    train_ids, val_ids = open_tokens(split, "train"), open_tokens(split, "val")
    assert train_ids.dtype == np.uint16 and os.path.getsize(split.train) == 2 * len(train_ids)
    for ids, part in ((train_ids, docs[:36]), (val_ids, docs[36:])):  # 10% of 40 documents held out, whole
        ids = [int(t) for t in ids]
        assert ids == [t for d in part for t in [*tok.encode(d), tok.eos_id]]
        assert ids.count(tok.eos_id) == len(part)
        assert tok.decode(ids) == "".join(part)  # byte-level BPE is lossless; EOS is skipped as special


def test_pretraining_lowers_loss(tmp_path: Path, corpus: list[str]) -> None:
    out = train(tiny_config(tmp_path))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))
    # a fresh model with std-0.02 weights predicts ~uniformly: CE = ln(vocab)
    assert rows[0]["loss"] == pytest.approx(math.log(300), abs=0.05)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.5
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 3 and val[0] > val[1] > val[2]
    assert out["val_ppl"] == pytest.approx(math.exp(val[-1]))
    for name in (
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "loss.png",
        "config.json",
    ):
        assert (tmp_path / "run" / name).is_file()


def test_aux_balance_loss_is_added(tmp_path: Path, corpus: list[str]) -> None:
    moe = dict(n_routed_experts=4, n_activated_experts=2, moe_inter_dim=16, aux_loss_alpha=0.1)
    train(tiny_config(tmp_path, model=moe, balance="aux", loop=dict(max_steps=2, eval_every=0)))
    for r in read_metrics(tmp_path / "run" / "metrics.jsonl"):
        # 2 MoE layers, each alpha * sum_i f_i P_i with sum_i f_i = N_r = 4, sum_i P_i = 1: alpha (balanced) to 4 alpha
        assert 0.09 < r["loss_bal"] / 2 < 0.1 * 4
        assert r["loss"] == pytest.approx(r["loss_main"] + r["loss_bal"], rel=1e-6)


def skewed_run(tmp_path: Path, balance: str) -> list[dict]:
    """4 experts top-1, router bias of expert 0 at +1: sigmoid scores lie in (0, 1), so every token picks it.

    The gate centroids get std 0.5 (not 0.02) so that tokens prefer different experts once the bias gap closes;
    with near-equal scores the bias alone would route every token to one expert (whichever leads at that step).
    """
    moe = dict(n_routed_experts=4, n_activated_experts=1, moe_inter_dim=16, bias_update_speed=0.05)
    cfg = tiny_config(tmp_path, balance, model=moe, balance=balance, loop=dict(max_steps=40, eval_every=0))
    tokenizer, _ = prepare_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer.vocab_size, tokenizer.eos_id)
    with torch.no_grad():
        for m in model.moe_layers:
            m.gate.weight.normal_(std=0.5)
            m.gate.bias[0] = 1.0
    train(cfg, model)
    return read_metrics(tmp_path / balance / "metrics.jsonl")


def test_bias_balancing_fixes_a_skewed_router_and_none_does_not(tmp_path: Path, corpus: list[str]) -> None:
    none = skewed_run(tmp_path, "none")
    bias = skewed_run(tmp_path, "bias")
    tokens = 4 * 32  # batch x seq, top-1: one expert choice per token per layer
    for r in none + bias:
        assert [sum(layer) for layer in r["expert_load"]] == [tokens, tokens]
    # all tokens on expert 0: load (N, 0, 0, 0), mean N/4, MaxVio = N / (N/4) - 1 = 3, for every step without balancing
    assert all(r["maxvio"] == pytest.approx(3.0) for r in none)
    assert bias[0]["maxvio"] == pytest.approx(3.0)
    # each step lowers b_0 by gamma = 0.05 while expert 0 is overloaded: after ~20 steps it stops winning everything
    late = [r["maxvio"] for r in bias[-10:]]
    assert sum(late) / len(late) < 1.0


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path: Path, corpus: list[str]) -> None:
    moe = dict(n_routed_experts=4, n_activated_experts=2, moe_inter_dim=16, mtp_depth=1, n_dense_layers=1)
    cfg = tiny_config(
        tmp_path, model=moe, balance="bias", loop=dict(max_steps=24, ckpt_every=4, eval_every=8)
    )
    prepare_data(cfg)  # both runs read the same token files
    config = {
        **{k: v for k, v in vars(cfg).items() if k != "loop"},
        "loop": {**vars(cfg.loop), "betas": list(cfg.loop.betas)},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "ragseek", "train", "pretrain", "--config", str(tmp_path / "cfg.yaml")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    full = tmp_path / "full"
    subprocess.run([*cmd, "--out", str(full)], check=True, env=env, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("checkpoint"):
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    last = max(int(p.name.removeprefix("step_")) for p in (killed / "checkpoints").glob("step_*"))
    assert last < 24
    subprocess.run(
        [*cmd, "--out", str(killed), "--resume"], check=True, env=env, capture_output=True, timeout=300
    )

    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 25))
    for key in ("loss", "loss_main", "loss_mtp", "maxvio", "val_loss"):
        assert [r.get(key) for r in b] == pytest.approx([r.get(key) for r in a], abs=1e-5), key


def test_config_defaults_are_fresh_values_per_instance() -> None:
    a, b = PretrainConfig(), PretrainConfig()
    a.model["dim"] = 32
    a.data.append("x.txt")
    a.loop.max_steps = 7
    assert (b.model, b.data, b.loop.max_steps) == ({}, [], LoopConfig().max_steps)
    assert isinstance(b.loop, LoopConfig)
