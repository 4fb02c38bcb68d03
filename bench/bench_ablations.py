"""DeepSeek's ablations at laptop scale: load balancing, expert granularity, attention kind, MTP.

    .venv/bin/python bench/bench_ablations.py [--only balance,experts,attention,mtp] [--steps 200] [--seeds 0,1]
    .venv/bin/python bench/bench_ablations.py --keep    # only the rows (and seeds) ablations.json lacks

Every row is one `ragseek train pretrain` run (its exact command is in the table) on the same tokens (SciFact +
GSM8K, BPE 4096, runs/pretrain_data), with the same batch, sequence length and number of steps, so equal
training tokens, once per seed (the seed sets the init and the data order); rows of one group have (nearly) equal
active parameters, listed per row. The inference numbers below come from the seed-0 models. Then, on the trained models: KV-cache bytes per
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

from ragseek.config import load_config
from ragseek.model.decoding import SamplingConfig, generate_ids, speculative_generate
from ragseek.model.transformer import Transformer
from ragseek.train.loop import read_metrics, set_seed
from ragseek.train.recipes.pretrain import PretrainConfig, build_model, open_tokens, prepare_data, train

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


def seeded(name: str, seed: int) -> str:
    """The key (and run folder) of a row's run with `seed`: the name itself for seed 0."""
    return name if seed == 0 else f"{name}_s{seed}"


def seed_sets(seed: int) -> list[str]:
    return [f"loop.seed={seed}"] if seed else []


def command(base: str, overrides: list[str], name: str, steps: int, seed: int = 0) -> str:
    sets = [*overrides, f"loop.max_steps={steps}", *seed_sets(seed)]
    return (
        f"ragseek train pretrain --config {base} "
        + " ".join(f"--set {s}" for s in sets)
        + f" --out {RUNS}/{seeded(name, seed)}"
    )


def run_row(name: str, base: str, overrides: list[str], steps: int, seed: int) -> tuple[dict, Transformer]:
    """Train one row; return its final numbers and curves, and the trained model (kept in memory for inference)."""
    out = Path(RUNS) / seeded(name, seed)
    sets = [*overrides, f"loop.max_steps={steps}", *seed_sets(seed), f"loop.out_dir={out}"]
    cfg = load_config(PretrainConfig, base, sets)
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


def per_seed(results: dict, name: str, seeds: list[int], key: str) -> list[float]:
    return [results[seeded(name, s)][key] for s in seeds if seeded(name, s) in results]


def joined(values: list[float | None], spec: str) -> str:
    return " / ".join(fmt(v, spec) for v in values)


def seed_spread(results: dict, seeds: list[int]) -> float | None:
    """Mean over rows of (max − min) val loss across seeds: how far apart two runs of the same row land."""
    spreads = [
        max(v) - min(v)
        for name in {r[0] for rows in ROWS.values() for r in rows}
        if len(v := per_seed(results, name, seeds, "val_loss")) > 1
    ]
    return sum(spreads) / len(spreads) if spreads else None


def report(results: dict, extra: dict, steps: int, load: float, seeds: list[int]) -> str:
    seed_list = " / ".join(map(str, seeds))
    spread = seed_spread(results, seeds)
    lines = [
        "## Pretraining ablations at laptop scale (bench_ablations)",
        "",
        f"`.venv/bin/python bench/bench_ablations.py --steps {steps} --seeds {','.join(map(str, seeds))}` — every "
        "row is the `ragseek train pretrain` command shown (same data, batch 8 x 128 tokens, equal steps, so equal "
        f"training tokens), run with seeds {seed_list} (seed s adds `--set loop.seed=s` and `_s<s>` to the run "
        "folder); val loss is the main head's CE on 32 fixed validation windows at the end, per seed, then their "
        "mean. MaxVio = max_i load_i / mean load - 1 per MoE layer, averaged over layers, and over the last 20% of "
        f"the steps, per seed. One CPU thread, load average {load:.1f} on 2 cores while it ran: speeds compare rows, "
        "not machines. Plots (seed 0): docs/ablations.md.",
        "",
    ]
    if spread is not None:
        lines += [
            f"**Seed noise**: the same row's val loss differs by {spread:.3f} on average between seeds — a "
            "difference between rows smaller than that is not a result.",
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
        head = f"| row | active params | val loss (seed {seed_list}) | mean | MaxVio (last 20%) |"
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
            losses = per_seed(results, name, seeds, "val_loss")
            common = f"| {label} | {r['active_params']:,} | {joined(losses, '.4f')} | {sum(losses) / len(losses):.4f} |"
            if group != "attention":
                lines.append(
                    f"{common} {joined(per_seed(results, name, seeds, 'maxvio_last20pct'), '.3f')} | {cmd} |"
                )
                continue
            for inf in extra.get(f"attention/{name}", [{}]):
                tag = f" {inf['impl']}" if inf.get("impl") else ""
                lines.append(
                    f"| {label}{tag} | {r['active_params']:,} | {joined(losses, '.4f')} | "
                    f"{sum(losses) / len(losses):.4f} | {inf.get('kv_bytes_per_token', '—')} | {inf.get('decode_tok_s_1024', '—')} | "
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
    ap.add_argument("--seeds", default="0,1", help="seeds every row runs with (comma-separated)")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the rows (and the inference numbers) already in ablations.json; run only what it lacks",
    )
    ap.add_argument(
        "--runs", default="runs/ablations", help="folder of the run folders (a smoke test uses a scratch one)"
    )
    args = ap.parse_args()
    RUNS = args.runs
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    os.chdir(ROOT)
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    extra: dict = {}
    loads = []
    if args.keep and (OUT / "ablations.json").exists():
        kept = json.loads((OUT / "ablations.json").read_text())
        if kept["steps"] != args.steps:
            raise SystemExit(f"--keep: ablations.json has {kept['steps']} steps, not {args.steps}")
        results, extra, loads = kept["rows"], kept["inference"], [kept["load_avg"]]
    models: dict[str, Transformer] = {}

    def write() -> None:
        loads.append(os.getloadavg()[0])
        load = sum(loads) / len(loads)
        (OUT / "ablations.json").write_text(
            json.dumps(
                {"steps": args.steps, "seeds": seeds, "rows": results, "inference": extra, "load_avg": load},
                indent=2,
            )
        )
        (OUT / "ablations.md").write_text(report(results, extra, args.steps, load, seeds))

    for group in args.only.split(","):
        for seed in seeds:
            for name, label, base, overrides in ROWS[group]:
                key = seeded(name, seed)
                if key not in results:
                    print(f"== {group}: {key} ({label})", flush=True)
                    results[key], model = run_row(name, base, overrides, args.steps, seed)
                    if seed == seeds[0]:
                        models[name] = model
                    write()
        if group == "attention":
            for name, *_ in ROWS[group]:
                if name in models or f"attention/{name}" not in extra:
                    extra[f"attention/{name}"] = attention_inference(models[name])
                    print(name, extra[f"attention/{name}"], flush=True)
                    write()
        if group == "mtp" and ("moe_b_bias" in models or "speculative" not in extra):
            extra["speculative"] = speculative(models["moe_b_bias"])
            print(extra["speculative"], flush=True)
            write()
    plots = set(extra.get("plots", []))
    for group in args.only.split(","):
        plots.add(plot(group, results, "curve_val", "val loss"))
        if group in ("balance", "experts"):
            plots.add(plot(group, results, "curve_maxvio", "MaxVio (mean over layers)"))
    extra["plots"] = sorted(plots)
    write()


if __name__ == "__main__":
    main()
