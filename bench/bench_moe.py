"""DeepSeekMoE speed: ragseek's sorted dispatch vs its naive per-expert masked loop vs transformers' DeepseekV3MoE.

    .venv/bin/python bench/bench_moe.py

CPU, fp32, 2 torch threads, the same weights and routing on every side (copied as in tests/model/test_moe.py).
Two levels: the routed experts alone, given one fixed routing (`Experts.forward` / `forward_naive`, transformers'
DeepseekV3Experts with its "eager" and "grouped_mm" implementations), and the whole layer (router + routed +
shared experts). Each is timed forward (no grad) and forward + backward; the best of REPEAT runs after a warm-up.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
THREADS = 2
REPEAT = 3
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"
SETTINGS = {
    "large": dict(
        batch=4, seq=1024, dim=512, experts=64, topk=6, shared=2, inter=256, groups=8, topk_groups=4
    ),
    "small": dict(batch=4, seq=256, dim=128, experts=16, topk=2, shared=1, inter=64, groups=4, topk_groups=2),
}


def best_of(fn: Callable[[], object], repeat: int = REPEAT) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def build(s: dict):
    """A ragseek MoE and transformers' DeepseekV3MoE (eager and grouped_mm experts) holding the same weights."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    from ragseek.model.config import ModelConfig
    from ragseek.model.moe import MoE

    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=s["dim"],
        moe_inter_dim=s["inter"],
        n_routed_experts=s["experts"],
        n_activated_experts=s["topk"],
        n_shared_experts=s["shared"],
        n_expert_groups=s["groups"],
        n_limited_groups=s["topk_groups"],
        route_scale=2.5,
        init_std=0.05,
    )
    ours = MoE(cfg)
    with torch.no_grad():
        ours.gate.bias.normal_(std=0.05)
    hf = {}
    for impl in ("eager", "grouped_mm"):
        hf_cfg = DeepseekV3Config(
            hidden_size=s["dim"],
            moe_intermediate_size=s["inter"],
            n_routed_experts=s["experts"],
            num_experts_per_tok=s["topk"],
            n_shared_experts=s["shared"],
            n_group=s["groups"],
            topk_group=s["topk_groups"],
            routed_scaling_factor=2.5,
        )
        hf_cfg._experts_implementation = impl  # read at every forward: one config per module
        m = DeepseekV3MoE(hf_cfg)
        with torch.no_grad():
            m.gate.weight.copy_(ours.gate.weight)
            m.gate.e_score_correction_bias.copy_(ours.gate.bias)
            m.experts.gate_up_proj.copy_(torch.cat([ours.experts.gate_proj, ours.experts.up_proj], dim=1))
            m.experts.down_proj.copy_(ours.experts.down_proj)
            m.shared_experts.load_state_dict(ours.shared_experts.state_dict())
        hf[impl] = m
    return ours, hf


def timings(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, module: torch.nn.Module
) -> dict:
    """Forward (no grad) and forward + backward seconds; None where the implementation raises."""

    def fwd() -> None:
        with torch.no_grad():
            forward(x)

    def fwd_bwd() -> None:
        module.zero_grad(set_to_none=True)
        forward(x).sum().backward()

    out = {}
    for name, fn in (("fwd_s", fwd), ("fwd_bwd_s", fwd_bwd)):
        try:
            out[name] = best_of(fn)
        except RuntimeError as e:  # transformers' grouped_mm has no CPU backward in torch 2.13
            out[name] = None
            out[f"{name}_error"] = str(e).splitlines()[0][:120]
    return out


def run_setting(name: str, s: dict) -> list[dict]:
    ours, hf = build(s)
    x = torch.randn(s["batch"], s["seq"], s["dim"])
    x2d = x.view(-1, s["dim"])
    with torch.no_grad():
        weights, indices, _ = ours.gate(x2d)
        err = (ours(x) - hf["eager"](x)).abs().max().item()
    rows = []

    def add(level: str, impl: str, forward: Callable, module: torch.nn.Module) -> None:
        row = {"setting": name, "level": level, "impl": impl, **timings(forward, x, module)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    # Routed experts alone, one fixed routing (weights detached: gradients reach the experts only).
    w = weights.detach()
    add("experts", "ragseek sorted", lambda x: ours.experts(x.view(-1, s["dim"]), indices, w), ours)
    add(
        "experts",
        "ragseek naive",
        lambda x: ours.experts.forward_naive(x.view(-1, s["dim"]), indices, w),
        ours,
    )
    for impl, m in hf.items():
        add("experts", f"transformers {impl}", lambda x, m=m: m.experts(x.view(-1, s["dim"]), indices, w), m)
    # The whole layer: router + routed + shared experts.
    add("layer", "ragseek MoE", ours, ours)
    for impl, m in hf.items():
        add("layer", f"transformers DeepseekV3MoE {impl}", m, m)
    for r in rows:
        r["max_abs_diff_vs_transformers"] = err
    return rows


def to_markdown(rows: list[dict]) -> str:
    def ms(v: float | None) -> str:
        return "fails" if v is None else f"{v * 1e3:.1f}"

    def ratio(v: float | None, ref: float | None) -> str:
        return "-" if v is None or ref is None else f"{v / ref:.2f}x"

    lines = [
        "## DeepSeekMoE dispatch (bench_moe)",
        "",
        "`.venv/bin/python bench/bench_moe.py` — CPU, fp32, 2 threads, best of 3 after a warm-up. Same weights and",
        "routing everywhere; `ratio` is time / ragseek sorted (experts) or / ragseek MoE (layer), so >1x is slower.",
        "",
    ]
    for name, s in SETTINGS.items():
        sub = [r for r in rows if r["setting"] == name]
        tokens = s["batch"] * s["seq"]
        lines += [
            f"**{name}**: {tokens} tokens, dim {s['dim']}, {s['experts']} experts top-{s['topk']} "
            f"({s['groups']} groups, {s['topk_groups']} kept), {s['shared']} shared, moe_inter_dim {s['inter']}; "
            f"max |ragseek - transformers| = {sub[0]['max_abs_diff_vs_transformers']:.1e}",
            "",
            "| level | implementation | fwd ms | ratio | fwd+bwd ms | ratio |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for level in ("experts", "layer"):
            group = [r for r in sub if r["level"] == level]
            ref = group[0]
            for r in group:
                lines.append(
                    f"| {level} | {r['impl']} | {ms(r['fwd_s'])} | {ratio(r['fwd_s'], ref['fwd_s'])} | "
                    f"{ms(r['fwd_bwd_s'])} | {ratio(r['fwd_bwd_s'], ref['fwd_bwd_s'])} |"
                )
        lines.append("")
    errors = sorted({r[k] for r in rows for k in r if k.endswith("_error")})
    lines += [f"'fails': {e}" for e in errors]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    torch.set_num_threads(THREADS)
    rows = [row for name, s in SETTINGS.items() for row in run_setting(name, s)]
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"threads": THREADS, "repeat": REPEAT, "torch": torch.__version__, "settings": SETTINGS}
    (OUT / "moe.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (OUT / "moe.md").write_text(to_markdown(rows))
    print((OUT / "moe.md").read_text())


if __name__ == "__main__":
    main()
