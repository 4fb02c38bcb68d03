"""DeepSeek's ablations at laptop scale: load balancing, expert granularity, attention kind, MTP.

    .venv/bin/python bench/bench_ablations.py [--only balance,experts,attention,mtp] [--steps 200]

Every row is one `ragseek train pretrain` run (its exact command is in the table) on the same tokens (SciFact +
GSM8K, BPE 4096, runs/pretrain_data), with the same seed, batch, sequence length and number of steps, so equal
training tokens; rows of one group have (nearly) equal active parameters, listed per row. Then, on the trained models: KV-cache bytes per
token from `make_cache(...).nbytes`, greedy decode tok/s at 1k and 4k context (MLA naive vs absorbed), and MTP
self-speculative decoding (acceptance of the drafted 2nd token, tokens per main forward, speedup vs plain greedy).
One torch thread (the 2-core CPU is shared with other jobs: compare rows, not absolute speeds).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from ragseek.model.generate import SamplingConfig, generate_ids, speculative_generate
from ragseek.model.transformer import Transformer
from ragseek.train.grpo import load_config
from ragseek.train.loop import read_metrics, set_seed
from ragseek.train.pretrain import PretrainConfig, build_model, open_tokens, prepare_data, train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"
IMG = ROOT / "docs" / "img"
RUNS = "runs/ablations"
MOE = "configs/pretrain_ablation_moe.yaml"
ATTN = "configs/pretrain_ablation_attn.yaml"

# group -> rows (name, what it is, base config, overrides)
ROWS: dict[str, list[tuple[str, str, str, list[str]]]] = {
    "balance": [
        ("moe_b_bias", "aux-loss-free bias, gamma=1e-2", MOE, ["balance=bias"]),
        ("moe_b_aux", "sequence-wise aux loss, alpha=1e-2", MOE, ["balance=aux"]),
        ("moe_b_none", "no balancing", MOE, ["balance=none"]),
    ],
    "experts": [
        (
            "moe_a",
            "(a) 4 experts x 128, top-1",
            MOE,
            ["model.n_routed_experts=4", "model.n_activated_experts=1", "model.moe_inter_dim=128"],
        ),
        ("moe_b_bias", "(b) 8 experts x 64, top-2", MOE, ["balance=bias"]),
        (
            "moe_c",
            "(c) 7 routed x 64 top-1 + 1 shared x 64",
            MOE,
            ["model.n_routed_experts=7", "model.n_activated_experts=1", "model.n_shared_experts=1"],
        ),
    ],
    "mtp": [
        ("moe_b_mtp0", "D=0 (no MTP)", MOE, ["model.mtp_depth=0"]),
        ("moe_b_bias", "D=1, lambda=0.3", MOE, ["balance=bias"]),
    ],
    "attention": [
        ("attn_mha", "MHA (4 KV heads)", ATTN, ["model.attention=mha", "model.n_kv_heads=4"]),
        ("attn_gqa", "GQA (2 KV heads)", ATTN, []),
        ("attn_mqa", "MQA (1 KV head)", ATTN, ["model.attention=mqa", "model.n_kv_heads=1"]),
        ("attn_mla", "MLA (d_c=32, d_h^R=16)", ATTN, ["model.attention=mla", "model.n_kv_heads=4"]),
    ],
}


def command(base: str, overrides: list[str], name: str, steps: int) -> str:
    sets = [*overrides, f"loop.max_steps={steps}"]
    return (
        f"ragseek train pretrain --config {base} "
        + " ".join(f"--set {s}" for s in sets)
        + f" --out {RUNS}/{name}"
    )


def run_row(name: str, base: str, overrides: list[str], steps: int) -> tuple[dict, Transformer]:
    """Train one row; return its final numbers and curves, and the trained model (kept in memory for inference)."""
    out = Path(RUNS) / name
    cfg = load_config(PretrainConfig, base, [*overrides, f"loop.max_steps={steps}", f"loop.out_dir={out}"])
    tokenizer, _ = prepare_data(cfg)
    set_seed(cfg.loop.seed)
    model = build_model(cfg, tokenizer.vocab_size, tokenizer.eos_id)
    t0 = time.perf_counter()
    summary = train(cfg, model)
    summary["train_s"] = time.perf_counter() - t0
    rows = read_metrics(out / "metrics.jsonl")
    vio = [r["maxvio"] for r in rows if "maxvio" in r]
    tail = vio[len(vio) * 4 // 5 :]
    return {
        "val_loss": summary["val_loss"],
        "val_ppl": summary["val_ppl"],
        "active_params": summary["active_params"],
        "params": summary["params"],
        "train_tokens": summary["train_tokens_seen"],
        "train_s": round(summary["train_s"], 1),
        "maxvio_last20pct": sum(tail) / len(tail) if tail else None,
        "maxvio_all": sum(vio) / len(vio) if vio else None,
        "curve_val": [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r],
        "curve_maxvio": [(r["step"], r["maxvio"]) for r in rows if "maxvio" in r],
    }, model


# --------------------------------------------------------------------------------------------------------------------
# inference measurements on the trained models


def with_impl(model: Transformer, impl: str) -> Transformer:
    """The same MLA weights with mla_impl switched (naive caches per-head K/V, absorbed the latent)."""
    from dataclasses import replace

    twin = Transformer(replace(model.cfg, mla_impl=impl))
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@torch.inference_mode()
def decode_tok_s(model: Transformer, context: int, new: int = 32, chunk: int = 512) -> tuple[float, int]:
    """Greedy decode tok/s after a context of `context` tokens already in the cache; and the cache bytes/token."""
    cache = model.make_cache(1, context + new)
    ids = torch.randint(0, model.cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    for s in range(0, context, chunk):  # prefill in chunks (the mask of one 4k prefill is large)
        logits = model(ids[:, s : s + chunk], cache=cache, start_pos=s)
    nxt = logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for i in range(new):
        nxt = model(nxt, cache=cache, start_pos=context + i)[:, -1:].argmax(-1)
    return new / (time.perf_counter() - t0), cache.nbytes // (context + new)


def attention_inference(model: Transformer) -> list[dict]:
    model = model.eval()
    variants = (
        [("absorbed", with_impl(model, "absorbed")), ("naive", with_impl(model, "naive"))]
        if model.cfg.attention == "mla"
        else [("", model)]
    )
    out = []
    for impl, m in variants:
        row = {"impl": impl}
        for ctx in (1024, 4096):
            tok_s, per_token = decode_tok_s(m, ctx)
            row[f"decode_tok_s_{ctx}"] = round(tok_s, 1)
            row["kv_bytes_per_token"] = per_token
        out.append(row)
    return out


@torch.inference_mode()
def speculative(model: Transformer, n_prompts: int = 6, prompt_len: int = 32, new: int = 64) -> dict:
    """Self-speculative (MTP) vs plain greedy on validation prompts: acceptance, tokens/step, wall-time speedup."""
    model = model.eval()
    cfg = load_config(PretrainConfig, MOE)
    _, split = prepare_data(cfg)
    val = open_tokens(split, "val")
    starts = torch.linspace(0, len(val) - prompt_len - 1, n_prompts).long().tolist()
    prompts = [[int(t) for t in val[s : s + prompt_len]] for s in starts]
    t_spec = t_plain = 0.0
    accepted = drafted = steps = 0
    identical = True
    for p in prompts:
        t0 = time.perf_counter()
        spec, stats = speculative_generate(model, p, new, set())
        t_spec += time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = generate_ids(model, [p], SamplingConfig(max_new_tokens=new, temperature=0.0), set())[0].tokens
        t_plain += time.perf_counter() - t0
        identical &= spec == plain
        accepted, drafted, steps = (
            accepted + stats.accepted[0],
            drafted + stats.drafted[0],
            steps + stats.steps,
        )
    return {
        "acceptance_2nd_token": accepted / drafted,
        "tokens_per_step": (steps + accepted) / steps,
        "speedup": t_plain / t_spec,
        "identical_to_greedy": identical,
        "prompts": n_prompts,
        "new_tokens": new,
    }


# --------------------------------------------------------------------------------------------------------------------
# report


def plot(group: str, results: dict, key: str, ylabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, label, *_ in ROWS[group]:
        if name in results and results[name][key]:
            ax.plot(*zip(*results[name][key], strict=True), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / f"ablation_{group}_{key.removeprefix('curve_')}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"img/{path.name}"


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def report(results: dict, extra: dict, steps: int, load: float) -> str:
    lines = [
        "## Pretraining ablations at laptop scale (bench_ablations)",
        "",
        f"`.venv/bin/python bench/bench_ablations.py --steps {steps}` — every row is the `ragseek train pretrain` "
        "command shown (same data, seed 0, batch 8 x 128 tokens, equal steps, so equal training tokens); val loss "
        "is the main head's CE on 32 fixed validation windows at the end. MaxVio = max_i load_i / mean load - 1 per "
        "MoE layer, averaged over layers, and over the last 20% of the steps. One CPU thread, load average "
        f"{load:.1f} on 2 cores while it ran: speeds compare rows, not machines. Plots: docs/ablations.md.",
        "",
    ]
    titles = {
        "balance": "Load balancing (8 experts x 64, top-2)",
        "experts": "Expert granularity: lecture figure (a) / (b) / (c), equal active expert width",
        "mtp": "Multi-token prediction",
        "attention": "Attention (dense 2-layer model)",
    }
    for group, rows in ROWS.items():
        done = [r for r in rows if r[0] in results]
        if not done:
            continue
        lines += [f"**{titles[group]}**", ""]
        head = "| row | active params | val loss | val ppl | MaxVio (last 20%) |"
        sep = "|---|---:|---:|---:|---:|"
        if group == "attention":
            head, sep = (
                head.replace(" MaxVio (last 20%) |", " KV bytes/token | decode tok/s @1k | @4k |"),
                sep + "---:|---:|",
            )
        lines += [head + " command |", sep + "---|"]
        for name, label, base, overrides in done:
            r = results[name]
            cmd = f"`{command(base, overrides, name, steps)}`"
            common = f"| {label} | {r['active_params']:,} | {r['val_loss']:.4f} | {r['val_ppl']:.1f} |"
            if group != "attention":
                lines.append(f"{common} {fmt(r['maxvio_last20pct'])} | {cmd} |")
                continue
            for inf in extra.get(f"attention/{name}", [{}]):
                tag = f" {inf['impl']}" if inf.get("impl") else ""
                lines.append(
                    f"| {label}{tag} | {r['active_params']:,} | {r['val_loss']:.4f} | {r['val_ppl']:.1f} | "
                    f"{inf.get('kv_bytes_per_token', '—')} | {inf.get('decode_tok_s_1024', '—')} | "
                    f"{inf.get('decode_tok_s_4096', '—')} | {cmd} |"
                )
        if group == "mtp" and "speculative" in extra:
            s = extra["speculative"]
            lines += [
                "",
                f"MTP self-speculative greedy decoding with the D=1 model ({s['prompts']} validation prompts x "
                f"{s['new_tokens']} new tokens): 2nd-token acceptance {s['acceptance_2nd_token']:.1%}, "
                f"{s['tokens_per_step']:.2f} tokens per main forward, wall-time speedup {s['speedup']:.2f}x vs plain "
                f"greedy; output identical to plain greedy: {s['identical_to_greedy']} "
                "(DeepSeek-V3: 85-90% acceptance, 1.8x).",
            ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    global RUNS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="balance,experts,mtp,attention")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument(
        "--runs", default="runs/ablations", help="folder of the run folders (a smoke test uses a scratch one)"
    )
    args = ap.parse_args()
    RUNS = args.runs
    torch.set_num_threads(1)
    os.chdir(ROOT)
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    extra: dict = {}
    models: dict[str, Transformer] = {}
    loads = []

    def write() -> None:
        loads.append(os.getloadavg()[0])
        load = sum(loads) / len(loads)
        curves = {k: {n: v for n, v in r.items()} for k, r in results.items()}
        (OUT / "ablations.json").write_text(
            json.dumps({"steps": args.steps, "rows": curves, "inference": extra, "load_avg": load}, indent=2)
        )
        (OUT / "ablations.md").write_text(report(results, extra, args.steps, load))

    for group in args.only.split(","):
        for name, label, base, overrides in ROWS[group]:
            if name not in results:
                print(f"== {group}: {name} ({label})", flush=True)
                results[name], models[name] = run_row(name, base, overrides, args.steps)
                write()
        if group == "attention":
            for name, *_ in ROWS[group]:
                extra[f"attention/{name}"] = attention_inference(models[name])
                print(name, extra[f"attention/{name}"], flush=True)
                write()
        if group == "mtp":
            extra["speculative"] = speculative(models["moe_b_bias"])
            print(extra["speculative"], flush=True)
            write()
    for group in args.only.split(","):
        extra.setdefault("plots", []).append(plot(group, results, "curve_val", "val loss"))
        if group in ("balance", "experts"):
            extra["plots"].append(plot(group, results, "curve_maxvio", "MaxVio (mean over layers)"))
    write()


if __name__ == "__main__":
    main()
