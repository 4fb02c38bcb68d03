"""LoRA: merge/unmerge, training touches only the adapter, and a saved adapter gives ragseek's logits in
peft + transformers (the independent reference) and back in ragseek."""

import json
import warnings

import pytest
import torch

from ragseek.model import ModelConfig, Transformer
from ragseek.model.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    unmerge,
)

TOL = 1e-4
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny(seed: int = 0, **kw) -> Transformer:
    """A tiny random llama-layout model (GQA, untied head) whose save_pretrained folder transformers loads."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        model_type="llama", vocab_size=211, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        inter_dim=96, max_seq_len=128, norm_eps=1e-6, tie_embeddings=False, init_std=0.1, **kw,
    )  # fmt: skip
    return Transformer(cfg).eval()


def _train_like(model: Transformer, seed: int = 1) -> None:
    """B is zero after apply_lora (the adapter is a no-op); give it what training would, so a wrong key shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _tokens(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 211, (2, 24), generator=torch.Generator().manual_seed(seed))


def _adapted(**lora) -> Transformer:
    model = apply_lora(_tiny(), LoRAConfig(**{"r": 4, "alpha": 8, "dropout": 0.0, **lora}))
    _train_like(model)
    return model.eval()


def test_merged_and_unmerged_forwards_agree_and_unmerge_restores_the_weights():
    model = _tiny()
    tokens = _tokens()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(tokens)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    assert len([m for m in model.modules() if isinstance(m, LoRALinear)]) == 2 * len(LLAMA)
    with torch.no_grad():
        # a fresh adapter (B = 0) is the identity
        assert torch.equal(model(tokens), base)
        _train_like(model)
        unmerged = model(tokens)
        assert (unmerged - base).abs().max().item() > 1e-2
        merge(model)
        merged = model(tokens)
        merge(model)  # idempotent
        assert torch.equal(model(tokens), merged)
    assert (merged - unmerged).abs().max().item() <= TOL
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in base_weights.items())
    unmerge(model)
    state = model.state_dict()
    for k, v in base_weights.items():
        torch.testing.assert_close(state[k], v, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), unmerged, atol=TOL, rtol=0)


def test_merge_and_unload_gives_a_plain_model_with_the_adapted_logits(tmp_path):
    model = _adapted()
    tokens = _tokens()
    with torch.no_grad():
        want = model(tokens)
    merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        got = Transformer.from_pretrained(tmp_path)(tokens)
    assert (got - want).abs().max().item() <= TOL


def test_only_lora_parameters_train():
    model = apply_lora(_tiny(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"layers.{i}.{m}.lora_{ab}.weight"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
        for ab in "AB"
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # every parameter goes to the optimiser: the frozen ones must stay put because they get no gradient
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    # two steps: with B = 0 the first step moves only B (dL/dA = B^T ... = 0), the second moves A too
    for _ in range(2):
        loss, _ = model.loss(_tokens())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n


def test_peft_loads_a_ragseek_adapter_onto_transformers_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = _adapted(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # the base folder is written by ragseek itself, before any adapter exists on it
    _tiny().save_pretrained(tmp_path / "base")
    save_adapter(model, tmp_path / "adapter", base=tmp_path / "base")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["bias"], config["fan_in_fan_out"]) == (
        4,
        8,
        "none",
        False,
    )
    assert sorted(config["target_modules"]) == sorted(LLAMA)
    assert config["base_model_name_or_path"] == str(tmp_path / "base")

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    # no "Unexpected keyword arguments" (an unknown adapter_config key) and no missing/unexpected adapter keys
    assert not [str(w.message) for w in caught if "keyword" in str(w.message) or "keys" in str(w.message)]
    peft_state = peft.get_peft_model_state_dict(peft_model)
    assert len(peft_state) == 2 * 2 * len(LLAMA)

    tokens = _tokens()
    with torch.no_grad():
        ref = peft_model(tokens).logits
        ours = model(tokens)
        diff = (ours - ref).abs().max().item()
        assert diff <= TOL, diff
        # the adapter matters: the bare base is far from both
        with peft_model.disable_adapter():
            assert (peft_model(tokens).logits - ref).abs().max().item() > 1e-2
        peft_model.merge_adapter()
        merge(model)
        assert (model(tokens) - peft_model(tokens).logits).abs().max().item() <= TOL
    print(f"max |logits ragseek - peft| = {diff:.2e}")


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = _adapted(target_modules=["q_proj", "layers.1.mlp.up_proj"], dropout=0.1)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # a name adapted in only some layers is written as its full transformers name, which PEFT matches exactly
    assert config["target_modules"] == ["model.layers.1.mlp.up_proj", "q_proj"]
    assert config["lora_dropout"] == 0.1
    loaded = load_adapter(_tiny(), tmp_path)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert set(adapter_state_dict(loaded)) == set(adapter_state_dict(model))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == set(adapter_state_dict(model))
    tokens = _tokens()
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    # a merged model saves its unmerged adapter and stays merged
    merge(model)
    save_adapter(model, tmp_path / "merged")
    assert all(layer.merged for layer in model.modules() if isinstance(layer, LoRALinear))
    with torch.no_grad():
        again = load_adapter(_tiny(), tmp_path / "merged")(tokens)
        assert (again - loaded(tokens)).abs().max().item() == 0


@pytest.mark.parametrize(
    "other, match",
    [
        (
            {"dim": 32, "head_dim": 8},
            r"adapter_model\.safetensors: this adapter was trained on a different base.*dim=64",
        ),
        ({"n_layers": 3}, r"adapter_model\.safetensors: .*n_layers=2 \(this model: 3\)"),
        ({"vocab_size": 300}, r"adapter_model\.safetensors: .*vocab_size=211"),
    ],
)
def test_an_adapter_for_another_base_model_is_a_clear_error(tmp_path, other, match):
    save_adapter(_adapted(), tmp_path)
    torch.manual_seed(0)
    wrong = Transformer(ModelConfig(**{**_tiny().cfg.to_dict(), **other}))
    with pytest.raises(ValueError, match=match):
        load_adapter(wrong, tmp_path)


def test_a_peft_adapter_without_fingerprint_is_checked_by_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    save_adapter(_adapted(), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file(load_file(str(path)), str(path))  # what PEFT writes: no ragseek_base metadata
    load_adapter(_tiny(), tmp_path)
    torch.manual_seed(0)
    narrow = Transformer(ModelConfig(**{**_tiny().cfg.to_dict(), "inter_dim": 48}))
    with pytest.raises(
        ValueError, match=r"adapter_model\.safetensors: layers\.0\.mlp\.down_proj\.lora_A is \(4, 96\)"
    ):
        load_adapter(narrow, tmp_path)
    torch.manual_seed(0)
    shallow = Transformer(ModelConfig(**{**_tiny().cfg.to_dict(), "n_layers": 1}))
    with pytest.raises(
        ValueError, match=r"adapter_model\.safetensors: has weights for .*layers\.1\..*n_layers=1"
    ):
        load_adapter(shallow, tmp_path)


def test_missing_or_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: not a folder"):
        load_adapter(_tiny(), tmp_path / "nowhere")
    save_adapter(_adapted(), tmp_path / "a")
    config, weights = tmp_path / "a" / "adapter_config.json", tmp_path / "a" / "adapter_model.safetensors"
    good_config, good_weights = config.read_text(), weights.read_bytes()

    weights.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: not a readable safetensors file"):
        load_adapter(_tiny(), tmp_path / "a")
    weights.write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: not a readable safetensors file"):
        load_adapter(_tiny(), tmp_path / "a")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors: no such file"):
        load_adapter(_tiny(), tmp_path / "a")
    weights.write_bytes(good_weights)

    config.write_text(good_config[:40])
    with pytest.raises(ValueError, match=r"adapter_config\.json: not valid JSON"):
        load_adapter(_tiny(), tmp_path / "a")
    config.write_text(good_config.replace('"LORA"', '"IA3"'))
    with pytest.raises(ValueError, match=r"adapter_config\.json: peft_type must be 'LORA', got 'IA3'"):
        load_adapter(_tiny(), tmp_path / "a")
    config.write_text(good_config.replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(ValueError, match=r"adapter_config\.json: use_dora=True is not supported"):
        load_adapter(_tiny(), tmp_path / "a")
    config.unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json: no such file"):
        load_adapter(_tiny(), tmp_path / "a")


def test_bad_configs_and_targets_are_clear_errors():
    with pytest.raises(ValueError, match="names no nn.Linear.*'q_proj'"):
        apply_lora(_tiny(), LoRAConfig(target_modules=["wq"]))
    with pytest.raises(ValueError, match="'all-linear' or a list"):
        LoRAConfig(target_modules="q_proj")
    with pytest.raises(ValueError, match="rank r"):
        LoRAConfig(r=0)
    model = apply_lora(_tiny(), LoRAConfig())
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(_tiny(), "unused")


def test_absorbed_mla_keeps_kv_b_proj_out():
    torch.manual_seed(0)
    cfg = ModelConfig(
        model_type="deepseek_v3", attention="mla", vocab_size=97, dim=32, n_layers=1, n_heads=2, q_lora_rank=16,
        kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, inter_dim=48, max_seq_len=64,
    )  # fmt: skip
    with pytest.raises(ValueError, match="kv_b_proj.weight directly"):
        apply_lora(Transformer(cfg), LoRAConfig(target_modules=["kv_b_proj"]))
    with pytest.warns(UserWarning, match="leaves kv_b_proj out"):
        model = apply_lora(Transformer(cfg), LoRAConfig())
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {
        "q_a_proj",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    naive = Transformer(cfg)
    for layer in naive.layers:
        layer.self_attn.impl = "naive"
    apply_lora(naive, LoRAConfig(target_modules=["kv_b_proj"]))
