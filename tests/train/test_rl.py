"""GRPO and PPO recipes and `eval math` on a tiny random Transformer with a 20-word vocabulary.

The learnable task: reward = the share of the word "a" in the completion (`share_of_a`), which a 2-layer model
picks up in a few steps. The eval-math reference is hand-worked: a model whose final norm is zeroed gives all-zero
logits, so greedy decoding always picks token id 0, which the tiny vocabulary makes the word "7".
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers
from typer.testing import CliRunner

from ragseek.config import load_config
from ragseek.model.config import ModelConfig
from ragseek.model.tokenizer import Tokenizer
from ragseek.model.transformer import Transformer
from ragseek.train.cli import register_math
from ragseek.train.loop import config_dict, read_metrics
from ragseek.train.recipes import grpo, ppo

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
WORDS = ["7", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]", "system", "user", "assistant"]
WORDS += ["a", "b", "c", "d", "e", "1", "2", "3", "8", "+", "What", "is"]


def share_of_a(prompts, completions, **kw) -> list[float]:
    """Toy rule reward: the fraction of words of the completion that are "a" (0 for an empty one)."""
    return [c.split().count("a") / max(len(c.split()), 1) for c in completions]


def tiny_tokenizer() -> Tokenizer:
    backend = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return Tokenizer(backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def tiny_model_dir(path: Path, zero_norm: bool = False) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=len(WORDS),
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        inter_dim=64,
        max_seq_len=64,
    )
    model = Transformer(cfg)
    if zero_norm:
        torch.nn.init.zeros_(model.norm.weight)
    model.save_pretrained(path)
    tiny_tokenizer().save(path)
    return path


def prompts_file(path: Path) -> Path:
    rows = [{"prompt": p, "answer": "1"} for p in ["a b", "c d", "b c", "d e", "e a", "What is 1 + 2"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_overrides(tmp_path: Path, **overrides) -> list[str]:
    """`--set` items: the tiny model and prompts, this test's out_dir and reward, then the test's own."""
    items = {
        "model": str(tiny_model_dir(tmp_path / "model")),
        "data": str(prompts_file(tmp_path / "prompts.jsonl")),
        "rewards": json.dumps([f"{__name__}:share_of_a"]),
        "loop.out_dir": str(tmp_path / "run"),
        **overrides,
    }
    return [f"{k}={v}" for k, v in items.items()]


def grpo_config(tmp_path: Path, **overrides) -> grpo.GRPOConfig:
    return load_config(grpo.GRPOConfig, CONFIGS / "grpo_tiny.yaml", tiny_overrides(tmp_path, **overrides))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return Transformer.from_pretrained(folder).state_dict()


def assert_trained(cfg, rows) -> None:
    before, after = weights(Path(cfg.model)), weights(Path(cfg.loop.out_dir) / "final")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, f"only {changed} changed"
    assert (Path(cfg.loop.out_dir) / "metrics.png").stat().st_size > 0
    logged = read_metrics(Path(cfg.loop.out_dir) / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(1, cfg.loop.max_steps + 1))
    assert logged == [json.loads(json.dumps(r)) for r in rows]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_grpo_reward_rises_and_parameters_change(tmp_path, dtype):
    """bf16: rollouts from the policy's bf16 copy, logps and gradients under bf16 autocast; it learns as well."""
    cfg = grpo_config(tmp_path, group_size=8, **{"loop.dtype": dtype})
    rows = grpo.train(cfg)
    assert_trained(cfg, rows)
    first, last = [sum(r["reward_mean"] for r in part) / 4 for part in (rows[:4], rows[-4:])]
    assert last > first + 0.4, (first, last)
    for key in (
        "reward_std",
        "accuracy",
        "clip_fraction",
        "entropy",
        "response_length",
        "tok_s",
        "gen_share",
    ):
        assert key in rows[-1]
    assert "kl" not in rows[-1]  # β = 0: no reference model, no KL


def test_grpo_trains_a_lora_adapter_and_goes_on_from_it(tmp_path):
    """A `lora:` block: only the adapter moves, final/ is an adapter folder; GRPO with model=that folder trains the
    same adapter on, from where it stopped (the first step's logps are the saved adapter's, not the base's)."""
    from ragseek.model.lora import adapter_state_dict, load_adapter

    cfg = grpo_config(tmp_path, **{"lora.r": 4, "lora.dropout": 0, "loop.max_steps": 4})
    grpo.train(cfg)
    final = Path(cfg.loop.out_dir) / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    trained = load_adapter(Transformer.from_pretrained(cfg.model), final)
    assert all(t.abs().max() > 0 for k, t in adapter_state_dict(trained).items() if "lora_B" in k)
    more = grpo_config(
        tmp_path, model=str(final), **{"loop.max_steps": 1, "loop.lr": 0, "loop.out_dir": tmp_path / "more"}
    )
    grpo.train(more)
    again = load_adapter(Transformer.from_pretrained(cfg.model), tmp_path / "more" / "final")
    for (k, a), b in zip(
        adapter_state_dict(trained).items(), adapter_state_dict(again).values(), strict=True
    ):
        assert torch.equal(a, b), k  # lr 0: the adapter it went on from, saved unchanged onto the same base
    with pytest.raises(ValueError, match="adapter folder"):
        grpo.train(grpo_config(tmp_path, model=str(final), **{"lora.r": 4}))


def test_bf16_rollout_model_follows_the_policy(tmp_path):
    policy = Transformer.from_pretrained(tiny_model_dir(tmp_path / "model"))
    assert grpo.RolloutModel(policy, "fp32")() is policy
    rollout_model = grpo.RolloutModel(policy, "bf16")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))  # an optimizer step, say
    copy = rollout_model()
    assert copy is not policy and all(p.dtype == torch.bfloat16 for p in copy.parameters())
    for (name, p), q in zip(policy.named_parameters(), copy.parameters(), strict=True):
        assert torch.equal(p.to(torch.bfloat16), q), name
    assert not any(q.requires_grad for q in copy.parameters())


def test_compiled_rollouts_sample_what_eager_ones_do_and_follow_the_weights(tmp_path):
    """compile_rollouts: the same completions as eager sampling (logits within ~1e-5), also after the policy's
    weights change in place (an optimizer step): the compiled step reads them, it did not bake them in."""
    from ragseek.train.data import load_prompts
    from ragseek.train.rollout import sample_groups

    policy = Transformer.from_pretrained(tiny_model_dir(tmp_path / "model"))
    tokenizer = tiny_tokenizer()
    rows = load_prompts(prompts_file(tmp_path / "prompts.jsonl"), tokenizer, 64)[:2]
    twin = copy.deepcopy(policy)
    eager, compiled = grpo.RolloutModel(twin, "fp32"), grpo.RolloutModel(policy, "fp32", compiled=True)
    if not hasattr(policy, "decode_step"):
        pytest.skip("no C++ compiler: compile_decoding leaves decoding eager")
    sampling = grpo.RolloutConfig(max_new_tokens=8).sampling(seed=0, step=1)
    for step in range(2):
        a, b = (sample_groups(m(), tokenizer, rows, 4, sampling).completions for m in (eager, compiled))
        assert a == b, step
        with torch.no_grad():
            for p, q in zip(policy.parameters(), twin.parameters(), strict=True):
                noise = torch.randn_like(p)
                p.add_(noise)
                q.add_(noise)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_every_loss_type_with_mu_and_reference(tmp_path, loss_type):
    """μ = 2 (old logps from the rollout forward: the 2nd update is off-policy) and β > 0 (k3 to the reference)."""
    cfg = grpo_config(
        tmp_path,
        loss_type=loss_type,
        mu=2,
        beta=0.1,
        epsilon_high=0.28,
        **{"loop.max_steps": 2, "loop.grad_accum": 2},
    )
    rows = grpo.train(cfg)
    assert_trained(cfg, rows)
    assert rows[0]["kl"] >= 0 and rows[-1]["kl"] > 0  # the policy moved away from the reference
    assert all(r["approx_kl"] >= 0 for r in rows)


def test_ppo_reward_rises_and_parameters_change(tmp_path):
    cfg = load_config(ppo.PPOConfig, CONFIGS / "ppo_tiny.yaml", tiny_overrides(tmp_path))
    rows = ppo.train(cfg)
    assert_trained(cfg, rows)
    first, last = [sum(r["score_mean"] for r in part) / 4 for part in (rows[:4], rows[-4:])]
    assert last > first + 0.4, (first, last)
    assert rows[-1]["value_loss"] >= 0 and "value_clip_fraction" in rows[-1]


def test_ppo_with_a_reward_model_scores_and_critic_start_from_it(tmp_path):
    """reward_model set: a (tiny, random) Bradley-Terry model scores the rollouts, the critic starts as its copy."""
    from ragseek.train.value_heads import RewardModel

    torch.manual_seed(1)
    rm = RewardModel(Transformer.from_pretrained(tiny_model_dir(tmp_path / "rm_base")))
    rm.save_pretrained(tmp_path / "rm")
    overrides = tiny_overrides(tmp_path, **{"reward_model": str(tmp_path / "rm"), "loop.max_steps": 2})
    cfg = load_config(ppo.PPOConfig, CONFIGS / "ppo_tiny.yaml", overrides)
    rows = ppo.train(cfg)
    assert_trained(cfg, rows)
    assert 0 <= rows[0]["accuracy"] <= 1  # the rows' answers are checked and logged, never used as the reward
    assert rows[0]["score_std"] > 0  # the reward model's scores differ between completions


def test_grpo_resume_after_sigkill_reproduces_the_losses(tmp_path):
    cfg = grpo_config(tmp_path, **{"loop.max_steps": 14, "loop.ckpt_every": 3})
    config = tmp_path / "grpo.yaml"
    config.write_text(json.dumps(config_dict(cfg)))
    reference = grpo.train(load_config(grpo.GRPOConfig, config, [f"loop.out_dir={tmp_path / 'ref'}"]))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ragseek", "train", "grpo", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = Path(cfg.loop.out_dir) / "metrics.jsonl"
    deadline = time.time() + 600  # generous: the machine may be shared
    while time.time() < deadline and not any(r["step"] >= 7 for r in read_metrics(metrics)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = max(r["step"] for r in read_metrics(metrics))
    assert 7 <= killed_at < 14, "the run was not killed between its checkpoints"

    resumed = grpo.main(str(config), [], resume=True)
    ckpt_step = resumed[0]["step"] - 1
    assert ckpt_step % 3 == 0 and ckpt_step >= 6
    for got, want in zip(resumed, reference[ckpt_step:], strict=True):
        assert got["step"] == want["step"]
        # grad_norm: the weights
        for key in ("loss", "grad_norm", "reward_mean", "entropy", "response_length"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (got["step"], key)
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, 15))


def test_eval_math_hand_worked(tmp_path):
    """The zero-norm model always answers "7 7 7 …": rows whose answer is 7 (GSM8K's "#### 7" too) are correct."""
    model = tiny_model_dir(tmp_path / "model", zero_norm=True)
    rows = [
        {"question": "What is 1 + 2", "answer": "7"},
        {"question": "What is 3 + 8 + 1", "answer": "8"},
        {"question": "What is 2", "answer": "a b #### 7"},
        {"question": "What is 1", "answer": "12"},
        {"question": "What is 8", "answer": "7"},
    ]
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import typer

    app = typer.Typer()
    register_math(app)
    # a second command keeps typer from collapsing the group into one command
    app.command("noop")(lambda: None)
    runner = CliRunner()
    for extra, accuracy, n in (([], 3 / 5, 5), (["--n", "4"], 2 / 4, 4), (["--batch-size", "2"], 3 / 5, 5)):
        result = runner.invoke(
            app,
            ["math", "--model", str(model), "--data", str(data), "--max-new-tokens", "3", "--json", *extra],
        )
        assert result.exit_code == 0, result.output
        out = json.loads(result.output)
        assert out["accuracy"] == pytest.approx(accuracy) and out["n"] == n
        assert out["tokens_generated"] == 3 * n
