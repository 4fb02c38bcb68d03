"""Multi-token prediction: the loss combines main and MTP parts as DeepSeek-V3 eq. 25, each MTP module predicts
t_{i+k+1}, and it trains."""

import torch
import torch.nn.functional as F

from ragseek.model import ModelConfig, Transformer


def tiny(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        inter_dim=48,
        max_seq_len=64,
        **kw,
    )
    return Transformer(cfg)


def test_mtp_loss_matches_a_direct_computation():
    model = tiny(mtp_depth=2, mtp_lambda=0.5)
    tokens = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    loss, parts = model.loss(tokens)
    # recompute by hand: main CE, then module k from h^{k-1}[:, :T-k] and Emb(t[:, k:]) predicting t[:, k+1:]
    h, rope, mask = model.hidden_states(tokens)
    main = F.cross_entropy(model.lm_head(model.norm(h[:, :-1])).flatten(0, 1), tokens[:, 1:].flatten())
    T, mtp = tokens.shape[1], []
    for k, module in enumerate(model.mtp, start=1):
        x = module.eh_proj(
            torch.cat([module.enorm(model.embed_tokens(tokens[:, k:])), module.hnorm(h[:, : T - k])], -1)
        )
        h = module.block(x, (rope[0][:, : T - k], rope[1][:, : T - k]), mask)  # None: causal
        logits = model.lm_head(module.norm(h[:, :-1]))
        mtp.append(F.cross_entropy(logits.flatten(0, 1), tokens[:, k + 1 :].flatten()))
    expected = main + 0.5 / 2 * (mtp[0] + mtp[1])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(parts["loss_main"], main, atol=1e-6)
    assert parts["loss_mtp"].shape == (2,)


def test_mtp_module_is_causal():
    """Changing a later token must not change an MTP module's earlier predictions (no peeking at t_{i+k+1})."""
    model = tiny(mtp_depth=1)
    a = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(2))
    b = a.clone()
    b[0, 7] = (b[0, 7] + 1) % 50
    outs = []
    for t in (a, b):
        h, rope, mask = model.hidden_states(t)
        m = model.mtp[0]
        outs.append(
            m(h[:, :9], model.embed_tokens(t[:, 1:]), (rope[0][:, :9], rope[1][:, :9]), mask)  # None: causal
        )
    # module input i combines h_i and Emb(t_{i+1}): positions i < 6 see only tokens <= 6
    assert torch.allclose(outs[0][:, :6], outs[1][:, :6], atol=1e-6)
    assert not torch.allclose(outs[0][:, 6], outs[1][:, 6], atol=1e-6)


def test_training_lowers_main_and_mtp_loss():
    model = tiny(mtp_depth=1)
    tokens = torch.arange(0, 48).remainder(50).view(2, 24)  # a fixed pattern to memorise
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    _, first = model.loss(tokens)
    for _ in range(30):
        loss, _ = model.loss(tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, last = model.loss(tokens)
    assert last["loss_main"] < 0.5 * first["loss_main"]
    assert last["loss_mtp"][0] < 0.5 * first["loss_mtp"][0]
