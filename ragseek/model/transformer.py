"""The Transformer: embeddings -> n_layers Blocks (attention + dense or MoE FFN) -> RMSNorm -> head, plus MTP.

    x = x + attn(norm(x));  x = x + ffn(norm(x))           pre-norm residual blocks (llama / DeepSeek)
    attn in {MHA, GQA, MQA, MLA};  ffn = SwiGLU for the first n_dense_layers, DeepSeekMoE after

Module names follow the transformers / DeepSeek-V3 checkpoints (`layers.3.self_attn.kv_b_proj`,
`layers.3.mlp.gate`), so a checkpoint loads by name; checkpoint.py only adds or strips the `model.` prefix
and stacks the per-expert weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ragseek.model.attention import ATTENTION, Cache, LayerCache, Quantize
from ragseek.model.config import ModelConfig
from ragseek.model.layers import MLP, RMSNorm, Rotary
from ragseek.model.moe import MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = ATTENTION[cfg.attention](cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x, rope, mask, cache: LayerCache | None = None, start_pos: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """Multi-token prediction module k (DeepSeek-V3 §2.2, eqs. 21-23), names as in the V3 checkpoint.

    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]);  h^k = Block(h');  P^k_{i+k+1} = Head(norm(h^k_i))
    The embedding and the output head are the main model's (shared, not copied).
    """

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, moe)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h_prev, emb_next, rope, mask, cache=None, start_pos=0) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(x, rope, mask, cache, start_pos)


class Transformer(nn.Module):
    # recompute each block's activations in the backward instead of keeping them (torch.utils.checkpoint, per
    # block): a training-time switch, set by the training loop (LoopConfig.activation_checkpointing), not saved
    activation_checkpointing: bool = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, moe) for moe in cfg.is_moe_layer)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(cfg, bool(cfg.n_routed_experts)) for _ in range(cfg.mtp_depth))
        self.rotary = Rotary(cfg)
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------------------------------------------------------
    def make_cache(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        quantize: Quantize = None,
        mtp: bool = False,
    ) -> Cache:
        """KV caches for every layer, on the model's device. MLA absorbed keeps only [c_KV; k_R]:
        B·S·n_layers·(d_c + d_h^R)·itemsize bytes.

        mtp=True appends one cache per MTP module's block (self-speculative decoding drafts with them).
        """
        max_seq_len = max_seq_len or self.cfg.max_seq_len
        blocks = [*self.layers, *(m.block for m in self.mtp)] if mtp else self.layers
        device = self.embed_tokens.weight.device
        return Cache(
            [
                LayerCache(b.self_attn.cache_shapes(), batch_size, max_seq_len, dtype, quantize, device)
                for b in blocks
            ]
        )

    def _positions_and_mask(
        self,
        B: int,
        T: int,
        start_pos: int,
        attention_mask: torch.Tensor | None,
        device: torch.device,
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-row rotary positions (B, T) and the attention mask (B, T, S) with S = start_pos + T.

        The mask is None without padding (an attention_mask of all ones counts as none) or segments: plain causal
        attention, the query at position start_pos + t seeing the keys up to it (`grouped_attention` then lets
        SDPA skip the masked blocks of a prefill, and a one-token decoding step sees every key with no mask at all).

        attention_mask (B, S) is 1 on real tokens, 0 on (left) padding, as in transformers: positions count real
        tokens only, so a left-padded row starts at 0; padded keys are never attended to.

        segments (B, S) is each token's example id in a packed row (`data.pack_examples`): a token attends only to
        the earlier tokens of its own example and its position counts from that example's first token, so every
        packed example computes what it would alone (mask = causal AND same segment AND not padding).
        """
        S = start_pos + T
        for name, given in (("attention_mask", attention_mask), ("segments", segments)):
            if given is not None and given.shape != (B, S):
                raise ValueError(
                    f"{name} must be (batch, start_pos + seq) = {(B, S)}, got {tuple(given.shape)}"
                )
        q_idx = torch.arange(start_pos, S, device=device)
        if segments is None and (attention_mask is None or bool(attention_mask.all())):
            return q_idx.expand(B, T), None
        k_idx = torch.arange(S, device=device)
        causal = k_idx[None, :] <= q_idx[:, None]  # (T, S)
        am = (
            torch.ones(B, S, dtype=torch.bool, device=device)
            if attention_mask is None
            else attention_mask.bool()
        )
        real = am.long()
        # real tokens up to and including each one
        counted = real.cumsum(-1)
        mask = causal[None] & am[:, None, :]
        if segments is not None:
            mask = mask & (segments[:, start_pos:, None] == segments[:, None, :])
            # count from the example's first token (the last index up to here where the segment id changes), so
            # subtract the real tokens before it
            first = torch.ones_like(am)
            first[:, 1:] = segments[:, 1:] != segments[:, :-1]
            starts = torch.where(first, k_idx, 0).cummax(-1).values
            counted = counted - (counted - real).gather(-1, starts)
        positions = (counted - 1).clamp_min(0)[:, start_pos:]
        # A padded query row would attend to nothing (NaN softmax); let it see itself. Its output is never used.
        pad_q = ~am[:, start_pos:]  # (B, T)
        if pad_q.any():
            diag = torch.zeros(T, S, dtype=torch.bool, device=device)
            diag[torch.arange(T), q_idx] = True
            mask = mask | (pad_q[:, :, None] & diag[None])
        return positions, mask

    def hidden_states(
        self,
        tokens: torch.Tensor,
        cache: Cache | None = None,
        start_pos: int = 0,
        attention_mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """Last block's output h (B, T, d) before the final norm, with the rope tables and mask used."""
        B, T = tokens.shape
        positions, mask = self._positions_and_mask(B, T, start_pos, attention_mask, tokens.device, segments)
        rope = self.rotary(positions)
        h = self.embed_tokens(tokens)
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:
                h = checkpoint(layer, h, rope, mask, use_reentrant=False)
            else:
                h = layer(h, rope, mask, cache.layers[i] if cache is not None else None, start_pos)
        return h, rope, mask

    def forward(
        self,
        tokens: torch.Tensor,
        cache: Cache | None = None,
        start_pos: int = 0,
        attention_mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab). With a cache, tokens sit at positions [start_pos, start_pos + T).

        attention_mask and segments (B, start_pos + T) as in `_positions_and_mask`: padding, packed examples."""
        h, _, _ = self.hidden_states(tokens, cache, start_pos, attention_mask, segments)
        return self.lm_head(self.norm(h))

    def loss(self, tokens: torch.Tensor, loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Next-token CE + lambda/D * sum_k MTP CE_k (DeepSeek-V3 eq. 25), and each part.

        tokens (B, T); loss_mask (B, T) marks the target tokens that count (default: all). The main head
        predicts t_{i+1} from h_i; MTP module k predicts t_{i+k+1} from h^k_i (i < T - k - 1).
        """
        h, rope, mask = self.hidden_states(tokens)
        main = _ce(
            self.lm_head(self.norm(h[:, :-1])), tokens[:, 1:], None if loss_mask is None else loss_mask[:, 1:]
        )
        parts = {"loss_main": main.detach()}
        total = main
        if self.cfg.mtp_depth:
            mtp_losses = []
            T = tokens.shape[1]
            for k, module in enumerate(self.mtp, start=1):
                if T - k - 1 <= 0:
                    break
                # h^{k-1}_i for i < T - k, combined with Emb(t_{i+k})
                h = module(
                    h[:, : T - k],
                    self.embed_tokens(tokens[:, k:]),
                    _crop(rope, T - k),
                    None if mask is None else mask[:, : T - k, : T - k],
                )
                logits = self.lm_head(module.norm(h[:, :-1]))
                target_mask = None if loss_mask is None else loss_mask[:, k + 1 :]
                mtp_losses.append(_ce(logits, tokens[:, k + 1 :], target_mask))
            if mtp_losses:
                mtp = torch.stack(mtp_losses)
                total = total + self.cfg.mtp_lambda * mtp.mean()
                parts["loss_mtp"] = mtp.detach()
        parts["loss"] = total.detach()
        return total, parts

    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
        """An HF folder (config.json + *.safetensors; llama / qwen2 / deepseek_v3 / ragseek) or a .gguf file."""
        from ragseek.model.checkpoint import load_model

        return load_model(path, dtype)

    def save_pretrained(self, path: str | Path) -> None:
        """config.json + model.safetensors in transformers naming (loadable by transformers for llama/qwen2/V3)."""
        from ragseek.model.checkpoint import save_model

        save_model(self, path)

    @property
    def moe_layers(self) -> list[MoE]:
        return [m.mlp for m in [*self.layers, *(mtp.block for mtp in self.mtp)] if isinstance(m.mlp, MoE)]

    def num_params(self, active: bool = False) -> int:
        """Parameters (tied embeddings once); active=True counts only the top-k routed experts of each MoE layer."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for moe in self.moe_layers:
                per_expert = sum(p[0].numel() for p in moe.experts.parameters())
                total -= per_expert * (self.cfg.n_routed_experts - self.cfg.n_activated_experts)
        return total


def _crop(rope: tuple[torch.Tensor, torch.Tensor], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    return rope[0][:, :T], rope[1][:, :T]


def _ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Token-mean cross-entropy over the masked targets."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    if mask is None:
        return losses.mean()
    mask = mask.flatten().to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp_min(1)
