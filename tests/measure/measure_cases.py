"""Shared pieces of the measure tests: the two-unit stack they trace, and the masks the runtime's attention
hands SDPA (to pin a facet's mask count against the code itself)."""

from __future__ import annotations

import ltmdsl


def stack(mixer: str):
    """The mixer (a layer expression) and a SwiGLU MLP, twice (d_model 64, bf16, vocabulary 256)."""
    return ltmdsl.loads(f"""
model m {{
    vocab = 256
    d_model = 64
    dtype = bf16
    norm = rmsnorm(eps = 1e-5)
    head = untied
    layer mix = {mixer}
    layer ffn = mlp(d_ff = 176, act = swiglu)
    stack {{ repeat 2 {{ mix ffn }} }}
}}
""").model


def runtime_masks(monkeypatch, Tq: int, shift: int, window: int | None, seed: int) -> list:
    """The attn_mask of every SDPA call of `ops_attention.attention` for Tq queries starting `shift` keys in
    (a cp piece), GQA 2/1, after checking its output against the float64 one-mask reference (1e-10)."""
    import torch
    import torch.nn.functional as F

    from ltmdsl.runtime import ops_attention as att
    from tests.helpers import assert_close

    masks = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, k, v, **kw):
        masks.append(kw.get("attn_mask"))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(att.F, "scaled_dot_product_attention", counting)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Tq, 2, 4, generator=g, dtype=torch.float64)  # [B, Tq, H, D]
    k, v = (torch.randn(1, Tq + shift, 1, 4, generator=g, dtype=torch.float64) for _ in range(2))  # [B, S, Hkv, D]
    out = att.attention(q, k, v, causal=True, window=window, scale=0.5)
    assert_close(out, att.attention_reference(q, k, v, causal=True, window=window, scale=0.5), 1e-10, "masked")
    assert all(m is not None for m in masks)
    return masks
