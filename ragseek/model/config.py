"""ModelConfig: one dataclass for every model ragseek builds or loads.

Names follow the DeepSeek-V3 reference code (`dim`, `inter_dim`, `n_routed_experts`, `kv_lora_rank`, ...).
`from_hf_config` reads a transformers config.json of model_type llama, qwen2 or deepseek_v3;
`to_hf_config` writes one back so transformers can load what ragseek saves.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from ragseek.config import config_field as _f

AttentionKind = Literal["mha", "gqa", "mqa", "mla"]
MLAImpl = Literal["naive", "absorbed"]
ScoreFunc = Literal["softmax", "sigmoid"]
ModelType = Literal["llama", "qwen2", "deepseek_v3", "ragseek"]


@dataclass
class ModelConfig:
    # --- identity and sizes
    model_type: ModelType = _f(
        "ragseek",
        "checkpoint layout written by save_pretrained: llama / qwen2 / deepseek_v3 are transformers-loadable; "
        "ragseek is for combinations transformers has no class for (e.g. GQA + MoE)",
    )
    vocab_size: int = _f(49152, "number of token embeddings")
    dim: int = _f(576, "hidden size d of the residual stream")
    n_layers: int = _f(30, "number of transformer blocks")
    n_heads: int = _f(9, "number of query heads")
    n_kv_heads: int = _f(3, "key/value heads for mha (= n_heads), gqa (divides n_heads) and mqa (= 1)")
    head_dim: int = _f(64, "per-head width for mha/gqa/mqa (MLA uses qk_*_head_dim and v_head_dim)")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon")
    max_seq_len: int = _f(8192, "longest sequence the rotary table and KV caches are built for")
    tie_embeddings: bool = _f(True, "share the token embedding matrix with the output head")
    init_std: float = _f(0.02, "std of the normal init for freshly built (not loaded) weights")
    bos_token_id: int | None = _f(
        None, "begin-of-sequence id (metadata only: the model never owns the tokenizer)"
    )
    eos_token_id: int | None = _f(None, "end-of-sequence id (metadata only)")

    # --- attention
    attention: AttentionKind = _f(
        "gqa", "mha, gqa, mqa (set by n_kv_heads) or mla (multi-head latent attention)"
    )
    attention_bias: bool = _f(False, "bias on the q/k/v projections (qwen2 has it)")
    rope_theta: float = _f(10000.0, "rotary base")
    rope_scaling: dict | None = _f(
        None,
        "None, {'type': 'linear', 'factor'} or {'type': 'yarn', 'factor', 'original_max_position_embeddings', "
        "'beta_fast', 'beta_slow', 'mscale', 'mscale_all_dim'} as in DeepSeek-V3",
    )
    rope_interleave: bool = _f(
        False, "rotate interleaved pairs (x0,x1),(x2,x3).. as DeepSeek's weights expect, instead of halves"
    )
    # MLA (DeepSeek-V2 §2.1): queries through an optional low-rank q_lora_rank, keys/values through a shared latent
    # c_KV of width kv_lora_rank, plus one decoupled rotary key of width qk_rope_head_dim shared by all heads.
    q_lora_rank: int = _f(0, "MLA query low-rank width d_c' (0 = full-rank query projection)")
    kv_lora_rank: int = _f(512, "MLA latent width d_c: the only per-token state cached besides k_rope")
    qk_nope_head_dim: int = _f(128, "MLA per-head query/key width without rotary")
    qk_rope_head_dim: int = _f(
        64, "MLA decoupled rotary query/key width d_h^R (the rotary key is shared by heads)"
    )
    v_head_dim: int = _f(128, "MLA per-head value width")
    mla_impl: MLAImpl = _f(
        "absorbed", "naive caches full per-head K/V; absorbed folds W_UK into q and W_UV after attention"
    )

    # --- feed-forward: dense SwiGLU for the first n_dense_layers, DeepSeekMoE after (when n_routed_experts > 0)
    inter_dim: int = _f(1536, "dense SwiGLU hidden width")
    n_dense_layers: int = _f(0, "first layers that keep a dense FFN (DeepSeek-V3: 3)")
    n_routed_experts: int = _f(0, "fine-grained routed experts per MoE layer (0 = dense model)")
    n_shared_experts: int = _f(0, "always-on shared experts per MoE layer")
    n_activated_experts: int = _f(0, "routed experts chosen per token (top-k)")
    moe_inter_dim: int = _f(0, "hidden width of each expert")
    score_func: ScoreFunc = _f("sigmoid", "router affinity: sigmoid (V3) or softmax (V2)")
    n_expert_groups: int = _f(1, "expert groups for group-limited routing")
    n_limited_groups: int = _f(1, "groups a token may route to")
    route_scale: float = _f(1.0, "scale on the routing weights (V3: 2.5)")
    norm_topk_prob: bool = _f(True, "renormalise the top-k weights to sum to 1 before route_scale")
    bias_update_speed: float = _f(
        1e-3, "gamma of the aux-loss-free bias update b_i += gamma * sign(mean load - load_i)"
    )
    aux_loss_alpha: float = _f(1e-4, "alpha of the sequence-wise balance loss alpha * sum_i f_i P_i")

    # --- multi-token prediction (DeepSeek-V3 §2.2)
    mtp_depth: int = _f(0, "D sequential MTP modules; module k predicts token i+k+1")
    mtp_lambda: float = _f(0.3, "weight lambda of the MTP loss: L = L_main + lambda/D * sum_k L_MTP^k")

    def __post_init__(self) -> None:
        expected = {"mha": self.n_heads, "mqa": 1}
        if self.attention in expected and self.n_kv_heads != expected[self.attention]:
            raise ValueError(
                f"attention={self.attention!r} needs n_kv_heads={expected[self.attention]}, got {self.n_kv_heads}: "
                "set n_kv_heads or pick attention='gqa'"
            )
        if self.attention != "mla" and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.n_routed_experts:
            if not 0 < self.n_activated_experts <= self.n_routed_experts:
                raise ValueError(
                    "set n_activated_experts to the top-k (1..n_routed_experts) of the MoE layers"
                )
            if self.moe_inter_dim <= 0:
                raise ValueError("set moe_inter_dim (the width of each expert) for an MoE model")
            if self.n_routed_experts % self.n_expert_groups or self.n_limited_groups > self.n_expert_groups:
                raise ValueError("n_expert_groups must divide n_routed_experts and be >= n_limited_groups")
        if self.rope_scaling and self.rope_scaling.get("type") not in ROPE_SCALING_TYPES:
            raise ValueError(
                f"rope_scaling type must be one of {ROPE_SCALING_TYPES}, got {self.rope_scaling}"
            )

    # --- derived
    @property
    def is_moe_layer(self) -> list[bool]:
        return [bool(self.n_routed_experts) and i >= self.n_dense_layers for i in range(self.n_layers)]

    @property
    def rope_dim(self) -> int:
        """Width the rotary embedding acts on: the decoupled key for MLA, the whole head otherwise."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale^2 under YaRN (DeepSeek-V3: mscale = 0.1 * mscale_all_dim * ln(factor) + 1)."""
        d_qk = self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim
        scale = d_qk**-0.5
        rs = self.rope_scaling or {}
        if rs.get("type") == "yarn" and rs.get("mscale_all_dim") and rs["factor"] > 1:
            mscale = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0
            scale *= mscale * mscale
        return scale

    # --- serialisation
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_hf_config(cls, hf: dict) -> ModelConfig:
        """Read a transformers config.json dict (model_type llama, qwen2 or deepseek_v3)."""
        model_type = hf.get("model_type")
        if model_type not in _FROM_HF:
            raise ValueError(
                f"model_type {model_type!r} is not supported: ragseek loads llama, qwen2 and deepseek_v3 checkpoints"
            )
        return _FROM_HF[model_type](hf)

    def to_hf_config(self) -> dict:
        """A transformers config.json dict for llama / qwen2 / deepseek_v3 layouts (ragseek's own for the rest)."""
        if self.model_type == "ragseek":
            return {"model_type": "ragseek", "ragseek": self.to_dict()}
        return _TO_HF[self.model_type](self)


ROPE_SCALING_TYPES = ("linear", "yarn")


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """rope_theta and scaling from either transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(
            f"rope scaling {kind!r} is not supported (supported: default, {', '.join(ROPE_SCALING_TYPES)})"
        )
    return theta, {"type": kind, **params}


def _common_from_hf(hf: dict) -> dict:
    theta, scaling = _rope_from_hf(hf)
    n_heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=hf.get("max_position_embeddings", 8192),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
        bos_token_id=_first(hf.get("bos_token_id")),
        eos_token_id=_first(hf.get("eos_token_id")),
        rope_theta=theta,
        rope_scaling=scaling,
        inter_dim=hf["intermediate_size"],
    )


def _first(x: Any) -> int | None:
    return x[0] if isinstance(x, list) else x


def _gqa_kind(n_heads: int, n_kv: int) -> AttentionKind:
    return "mha" if n_kv == n_heads else "mqa" if n_kv == 1 else "gqa"


def _llama_from_hf(hf: dict, model_type: ModelType = "llama", bias_default: bool = False) -> ModelConfig:
    common = _common_from_hf(hf)
    n_kv = hf.get("num_key_value_heads") or common["n_heads"]
    if hf.get("mlp_bias"):
        raise ValueError("llama checkpoints with mlp_bias=True are not supported")
    return ModelConfig(
        model_type=model_type,
        n_kv_heads=n_kv,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        attention=_gqa_kind(common["n_heads"], n_kv),
        attention_bias=bool(hf.get("attention_bias", bias_default)),
        **common,
    )


def _qwen2_from_hf(hf: dict) -> ModelConfig:
    return _llama_from_hf(hf, model_type="qwen2", bias_default=True)


def _deepseek_v3_from_hf(hf: dict) -> ModelConfig:
    common = _common_from_hf(hf)
    if hf.get("attention_bias"):
        raise ValueError("deepseek_v3 checkpoints with attention_bias=True are not supported")
    return ModelConfig(
        model_type="deepseek_v3",
        n_kv_heads=common["n_heads"],
        head_dim=hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"],
        attention="mla",
        rope_interleave=bool(hf.get("rope_interleave", True)),
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        n_dense_layers=hf.get("first_k_dense_replace", 0),
        n_routed_experts=hf.get("n_routed_experts") or 0,
        n_shared_experts=hf.get("n_shared_experts") or 0,
        n_activated_experts=hf.get("num_experts_per_tok") or 0,
        moe_inter_dim=hf.get("moe_intermediate_size") or 0,
        score_func=hf.get("scoring_func", "sigmoid"),
        n_expert_groups=hf.get("n_group") or 1,
        n_limited_groups=hf.get("topk_group") or 1,
        route_scale=hf.get("routed_scaling_factor", 1.0),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        # DeepSeek-V3 checkpoints carry num_nextn_predict_layers MTP modules; ragseek loads them when present.
        mtp_depth=0,
        **common,
    )


_FROM_HF = {"llama": _llama_from_hf, "qwen2": _qwen2_from_hf, "deepseek_v3": _deepseek_v3_from_hf}


def _rope_to_hf(c: ModelConfig) -> dict:
    params: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": "default"}
    if c.rope_scaling:
        rest = {k: v for k, v in c.rope_scaling.items() if k != "type"}
        params.update(rope_type=c.rope_scaling["type"], **rest)
    return {"rope_theta": c.rope_theta, "rope_parameters": params}


def _common_to_hf(c: ModelConfig, model_type: str, architecture: str) -> dict:
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.inter_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "rms_norm_eps": c.norm_eps,
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.init_std,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        **_rope_to_hf(c),
    }


def _llama_to_hf(c: ModelConfig) -> dict:
    if c.attention == "mla" or c.n_routed_experts or c.mtp_depth:
        raise ValueError("a llama/qwen2 checkpoint holds dense MHA/GQA/MQA only: use model_type='ragseek'")
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[c.model_type]
    hf = _common_to_hf(c, c.model_type, arch)
    hf.update(num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim)
    if c.model_type == "llama":
        hf.update(attention_bias=c.attention_bias, mlp_bias=False)
    elif not c.attention_bias:
        raise ValueError("qwen2 checkpoints always have q/k/v biases: set attention_bias=True or use llama")
    return hf


def _deepseek_v3_to_hf(c: ModelConfig) -> dict:
    if c.attention != "mla":
        raise ValueError(
            "a deepseek_v3 checkpoint needs attention='mla': use model_type='ragseek' for GQA + MoE"
        )
    if c.n_routed_experts and c.score_func != "sigmoid":
        raise ValueError(
            "transformers' DeepseekV3 routes with sigmoid scores: use model_type='ragseek' for softmax"
        )
    hf = _common_to_hf(c, "deepseek_v3", "DeepseekV3ForCausalLM")
    moe = bool(c.n_routed_experts)
    hf.update(
        num_key_value_heads=c.n_heads,
        q_lora_rank=c.q_lora_rank or None,
        kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim,
        rope_interleave=c.rope_interleave,
        attention_bias=False,
        first_k_dense_replace=c.n_dense_layers if moe else c.n_layers,
        n_routed_experts=c.n_routed_experts if moe else 1,
        n_shared_experts=c.n_shared_experts,
        num_experts_per_tok=c.n_activated_experts if moe else 1,
        moe_intermediate_size=c.moe_inter_dim if moe else 1,
        n_group=c.n_expert_groups,
        topk_group=c.n_limited_groups,
        routed_scaling_factor=c.route_scale,
        norm_topk_prob=c.norm_topk_prob,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        num_nextn_predict_layers=c.mtp_depth,
    )
    return hf


_TO_HF = {"llama": _llama_to_hf, "qwen2": _llama_to_hf, "deepseek_v3": _deepseek_v3_to_hf}
