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
lambda to a power >= 0, so nothing overflows whatever the slope or block length. The blocks run one at
a time (`ops_recurrence`: T/C Python steps, never T, the last block possibly shorter): one block's fp32
terms exist at a time, each block's output is written into the output as it is made, and under autograd
only q, k, v and the given state are saved, the backward recomputing the block states and each block's
terms (as a fused chunk kernel does).

The decay enters as the per-head slope tensor s [H], so the layer computes it; `minimax_slopes` gives
MiniMax-01's (transformers' `MiniMaxLightningAttention.get_slope_rate`): s_h = 2^(-8(h+1)/H) scaled by
(1 - l/(L-1) + 1e-5) for layer l of L.

`lightning_step` is the decode form; `lightning_attention_reference` is the token-loop oracle of both.
"""

from __future__ import annotations

import functools

import torch

from ltmdsl.runtime import ops_recurrence


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


def _block_step(
    h: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of n <= C tokens from its start state h [B,H,D,Dv] (work dtype); q, k [B,n,H,D]; v [B,n,H,Dv];
    slope [H] -> (o [B,n,H,Dv] in the work dtype, the state after the block [B,H,D,Dv])."""
    work, n = h.dtype, q.shape[1]
    s = slope.to(work)  # [H]
    qb, kb, vb = (t.to(work).transpose(1, 2) for t in (q, k, v))  # [B, H, n, D | Dv]
    pos = torch.arange(n, device=h.device, dtype=work)  # [n]
    dist = pos[:, None] - pos[None, :]  # [n(i), n(j)]
    # Intra-block: o_i = sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j
    mask = torch.exp(-s[:, None, None] * dist.clamp(min=0)).masked_fill(dist < 0, 0.0)  # [H, n, n]
    o = ((qb @ kb.transpose(-1, -2)) * mask) @ vb  # [B, H, n, Dv]
    # Inter-block: the carried-in state, decayed to position i by lambda^(i+1)
    query_decay = torch.exp(-s[:, None] * (pos[None, :] + 1))  # [H, n]
    o = o + (qb * query_decay[..., None]) @ h  # [B, H, n, Dv]
    # The state after the block: lambda^n h + sum_j lambda^(n-1-j) k_j v_j^T
    key_decay = torch.exp(-s[:, None] * (n - 1 - pos)[None, :])  # [H, n]
    nxt = torch.exp(-s * n)[:, None, None] * h  # [B, H, D, Dv]
    nxt += (kb * key_decay[..., None]).transpose(-1, -2) @ vb  # in place: three states live at most
    return o.transpose(1, 2), nxt


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
    Block by block (`ops_recurrence.chunked`): the output is written as each block is done, and under
    autograd only q, k, v, the slopes and the given state are saved; backward recomputes the rest.
    Oracle: `lightning_attention_reference`.
    """
    if chunk < 1:
        raise ValueError(f"lightning_attention: chunk must be >= 1, got {chunk}")
    work = _work_dtype(q)
    Bsz, T, H, D = q.shape
    Dv = v.shape[-1]
    zeros = functools.partial(torch.zeros, Bsz, H, D, Dv, dtype=work, device=q.device)  # [B, H, D, Dv]

    if T == 0:  # an empty prefill leaves the state as it was
        return q.new_zeros(Bsz, 0, H, Dv), zeros() if state is None else state.to(work)
    return ops_recurrence.chunked(_block_step, chunk, None if state is None else state.to(work), (q, k, v), (slope,),
                                  out=(H, Dv), out_dtype=q.dtype, new_state=zeros)


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
