"""Lightning attention: decayed linear attention in blocks, the one-token step and the token-loop oracle.

Per head h, with a constant decay lambda_h = exp(-s_h) (s_h > 0, the head's slope):
    S_t = lambda_h * S_{t-1} + k_t (outer) v_t          S [B, H, D, Dv]
    o_t = q_t . S_t                                       o [B, H, Dv]
i.e. o_t = sum_{j<=t} lambda_h^(t-j) (q_t . k_j) v_j + lambda_h^t q_t . S_0, with no softmax, no
1/sqrt(D) scale and no normaliser inside the op (MiniMax-01 applies an RMSNorm and a sigmoid output
gate after it, and SiLU to q, k, v before it: the layer's work).

`lightning_attention` is the block form of Lightning Attention-2 (Qin et al. 2024, "Lightning Attention-2:
A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models"; used by MiniMax 2025,
"MiniMax-01: Scaling Foundation Models with Lightning Attention"): the sequence is cut into blocks of C
tokens; inside a block the output is a masked quadratic product with the decay mask lambda^(i-j)
(i >= j), across blocks it goes through the carried state, decayed to each position (lambda^(i+1) for
the i-th token of a block). Every decay factor is
lambda to a power >= 0, so nothing overflows whatever the slope or block length. The intra-block
products of all blocks are one batched matmul; the state crosses block boundaries once per block
(T/C Python steps, never T).

The decay enters as the per-head slope tensor s [H], so the layer computes it; `minimax_slopes` gives
MiniMax-01's (transformers' `MiniMaxLightningAttention.get_slope_rate`): s_h = 2^(-8(h+1)/H) scaled by
(1 - l/(L-1) + 1e-5) for layer l of L.

`lightning_step` is the decode form; `lightning_attention_reference` is the token-loop oracle of both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """Runs in fp32, or fp64 when given fp64 (the oracle precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def minimax_slopes(heads: int, layer: int, layers: int) -> torch.Tensor:
    """MiniMax-01's decay slopes s [H] (float64) for layer `layer` (0-based) of `layers`.

    The ALiBi-style geometric sequence 2^(-8 (h+1) / H) (Press et al. 2022), shrunk linearly with depth
    so the last layers decay slowest (their `1e-5` guards keep the last layer's slope positive).
    """
    base = 2.0 ** (-8.0 / heads)
    rate = base ** torch.arange(1, heads + 1, dtype=torch.float64)  # [H]
    return rate * (1.0 - layer / (layers - 1 + 1e-5) + 1e-5)


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    *,
    chunk: int,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block (chunked) lightning attention.

    q, k [B,T,H,D]; v [B,T,H,Dv]; slope [H] (> 0, decay exp(-slope)); state [B,H,D,Dv] | None (zeros)
    -> (o [B,T,H,Dv] in q's dtype, final_state [B,H,D,Dv] in the work dtype).
    Oracle: `lightning_attention_reference`.
    """
    if chunk < 1:
        raise ValueError(f"lightning_attention: chunk must be >= 1, got {chunk}")
    work = _work_dtype(q)
    Bsz, T, H, D = q.shape
    Dv = v.shape[-1]
    C = chunk
    pad = (C - T % C) % C
    nc = (T + pad) // C
    s = slope.to(work)  # [H]
    if T == 0:  # an empty prefill leaves the state as it was
        h = torch.zeros(Bsz, H, D, Dv, dtype=work, device=q.device) if state is None else state.to(work)
        return q.new_zeros(Bsz, 0, H, Dv), h

    def blocks(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t.to(work), (0, 0, 0, 0, 0, pad))  # zero k, v in the padding add nothing
        return t.reshape(Bsz, nc, C, H, t.shape[-1])

    qb, kb, vb = blocks(q), blocks(k), blocks(v)  # [B, nc, C, H, D|Dv]

    # Intra-block: o_i += sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j; the mask is the same for every block.
    pos = torch.arange(C, device=q.device, dtype=work)  # [C]
    dist = pos[:, None] - pos[None, :]  # [C(i), C(j)]
    mask = torch.exp(-s[:, None, None] * dist.clamp(min=0))  # [H, C, C]
    mask = mask.masked_fill(dist[None] < 0, 0.0)
    scores = torch.einsum("bcihd,bcjhd->bchij", qb, kb) * mask  # [B, nc, H, C, C]
    o = torch.einsum("bchij,bcjhv->bcihv", scores, vb)  # [B, nc, C, H, Dv]

    # Each block's contribution to its end state: lambda^(L-1-j) k_j v_j for the block's L real tokens.
    lengths = torch.full((nc,), C, device=q.device, dtype=work)  # [nc]
    lengths[-1] = C - pad
    to_end = lengths[:, None] - 1 - pos[None, :]  # [nc, C]   negative only in the padding
    key_decay = torch.exp(-s[None, None, :] * to_end.clamp(min=0)[..., None])  # [nc, C, H]
    contrib = torch.einsum("bcjhd,cjh,bcjhv->bchdv", kb, key_decay, vb)  # [B, nc, H, D, Dv]
    block_decay = torch.exp(-s[None, :] * lengths[:, None])  # [nc, H]

    h = torch.zeros(Bsz, H, D, Dv, dtype=work, device=q.device) if state is None else state.to(work)
    starts = []
    for c in range(nc):
        starts.append(h)
        h = block_decay[c, None, :, None, None] * h + contrib[:, c]  # [B, H, D, Dv]
    start = torch.stack(starts, dim=1)  # [B, nc, H, D, Dv]

    # Inter-block: the carried-in state, decayed to position i of the block by lambda^(i+1).
    query_decay = torch.exp(-s[None, :] * (pos[:, None] + 1))  # [C, H]
    o = o + torch.einsum("bcihd,ih,bchdv->bcihv", qb, query_decay, start)
    o = o.reshape(Bsz, nc * C, H, Dv)[:, :T]  # [B, T, H, Dv]
    return o.to(q.dtype), h


def lightning_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """One token: q, k [B,H,D]; v [B,H,Dv]; slope [H]; state [B,H,D,Dv] (updated in place) -> o [B,H,Dv]."""
    work = _work_dtype(q)
    decay = torch.exp(-slope.to(work))[None, :, None, None]  # [1, H, 1, 1]
    h = decay * state.to(work) + k.to(work)[..., :, None] * v.to(work)[..., None, :]  # [B, H, D, Dv]
    state.copy_(h)
    return torch.einsum("bhd,bhdv->bhv", q.to(work), h).to(q.dtype)


def lightning_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    *,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-loop oracle of `lightning_attention` / `lightning_step`, computed in the inputs' dtype."""
    Bsz, T, H, D = q.shape
    Dv = v.shape[-1]
    h = torch.zeros(Bsz, H, D, Dv, dtype=q.dtype, device=q.device) if state is None else state.clone().to(q.dtype)
    decay = torch.exp(-slope.to(q.dtype))[None, :, None, None]  # [1, H, 1, 1]
    outs = []
    for t in range(T):
        h = decay * h + k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, D, Dv]
        outs.append(torch.einsum("bhd,bhdv->bhv", q[:, t], h))
    return torch.stack(outs, dim=1), h
