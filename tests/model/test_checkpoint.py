"""Loading a checkpoint uses every weight it holds: a config.json naming fewer layers than the weights is an error,
not a model that silently drops the rest and prints garbage."""

import json

import pytest
import torch

from ragseek.model.config import ModelConfig
from ragseek.model.transformer import Transformer

LLAMA = ModelConfig(
    model_type="llama", vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, inter_dim=64,
    max_seq_len=64,
)  # fmt: skip
# a dense layer, an MoE layer and one MTP module, which DeepSeek-V3 stores as layer n_layers + 0
V3 = ModelConfig(
    model_type="deepseek_v3", attention="mla", vocab_size=97, dim=32, n_layers=2, n_heads=2, q_lora_rank=16,
    kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, inter_dim=48, max_seq_len=64,
    n_dense_layers=1, n_routed_experts=4, n_activated_experts=2, n_shared_experts=1, moe_inter_dim=16, mtp_depth=1,
)  # fmt: skip


@pytest.mark.parametrize("cfg", [LLAMA, V3], ids=["llama", "deepseek_v3-mtp"])
def test_fewer_layers_in_config_json_than_in_the_weights_is_an_error(tmp_path, cfg):
    torch.manual_seed(0)
    model, tokens = Transformer(cfg), torch.randint(0, 97, (1, 8))
    model.save_pretrained(tmp_path)
    # as saved, it loads whole (V3's MTP module has routed experts: stacked again on load)
    torch.testing.assert_close(Transformer.from_pretrained(tmp_path)(tokens), model(tokens))
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["num_hidden_layers"] -= 1
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=f"num_hidden_layers={cfg.n_layers - 1}.*layers {cfg.n_layers - 1}"):
        Transformer.from_pretrained(tmp_path)
