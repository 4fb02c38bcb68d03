"""Parity with transformers: tiny random Llama / Qwen2 / DeepseekV3 checkpoints give the same logits in ragseek,
and what ragseek saves loads back into transformers with the same logits."""

import pytest
import torch
import transformers

from ragseek.model import ModelConfig, Transformer

TOL = 1e-4


def _tiny(kind: str, **kw):
    common = dict(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(**{**common, "num_key_value_heads": 2, **kw})
        return transformers.LlamaForCausalLM(cfg)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, "num_key_value_heads": 2, **kw})
        return transformers.Qwen2ForCausalLM(cfg)
    cfg = transformers.DeepseekV3Config(
        **{
            **common,
            "num_key_value_heads": 4,
            "moe_intermediate_size": 24,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "n_group": 4,
            "topk_group": 2,
            "first_k_dense_replace": 1,
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 16,
            "v_head_dim": 12,
            "routed_scaling_factor": 2.5,
            **kw,
        }
    )
    return transformers.DeepseekV3ForCausalLM(cfg)


def _randomise(model):
    """Random weights everywhere (norms and the routing bias too), so a wrong name or a skipped term shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                torch.randn_like(p) * (0.3 if "norm" not in name else 0.2) + (1.0 if "norm" in name else 0.0)
            )
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn_like(b) * 0.5)
    return model.eval()


CASES = {
    "llama": ("llama", {}),
    "llama-tied-mqa": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "llama-mha-yarn": (
        "llama",
        {
            "num_key_value_heads": 4,
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 10000.0,
            },
        },
    ),
    "qwen2": ("qwen2", {}),
    "deepseek_v3": ("deepseek_v3", {}),
    "deepseek_v3-no-qlora-halves": ("deepseek_v3", {"q_lora_rank": None, "rope_interleave": False}),
    "deepseek_v3-yarn": (
        "deepseek_v3",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 32,
                "rope_theta": 10000.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "beta_fast": 32,
                "beta_slow": 1,
            }
        },
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_transformers_to_ragseek_to_transformers(case, tmp_path):
    kind, kw = CASES[case]
    hf = _randomise(_tiny(kind, **kw))
    hf.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 211, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        model = Transformer.from_pretrained(tmp_path / "hf")
        ours = model(tokens)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL * max(1.0, ref.abs().max().item() / 10)
    # and back: ragseek writes a folder transformers loads to the same logits
    model.save_pretrained(tmp_path / "ours")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        back = hf2(tokens).logits
    assert (back - ref).abs().max().item() <= TOL * max(1.0, ref.abs().max().item() / 10)


def test_deepseek_v3_mla_absorbed_prefill_matches_transformers(tmp_path):
    hf = _randomise(_tiny("deepseek_v3"))
    hf.save_pretrained(tmp_path)
    model = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, 211, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(tokens).logits
        for impl in ("naive", "absorbed"):
            for layer in model.layers:
                layer.self_attn.impl = impl
            cache = model.make_cache(1, 32)
            assert (model(tokens, cache) - ref).abs().max().item() <= TOL * 10


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"junk")
    with pytest.raises(FileNotFoundError, match="gguf"):
        Transformer.from_pretrained(tmp_path / "x.bin")
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        ModelConfig.from_hf_config({"model_type": "gpt2"})
    hf = _tiny("llama")
    hf.save_pretrained(tmp_path / "m")
    cfg = (tmp_path / "m" / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 32')
    (tmp_path / "m" / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="do not match config.json"):
        Transformer.from_pretrained(tmp_path / "m")
