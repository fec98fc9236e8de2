"""Mamba-2 state-space duality (SSD): the chunked scan, the one-token step and the token-loop oracle.

Per head h (scalar decay a = dt * A[h]), with group g(h) = h // (Hs / G) supplying B and C:
    S_t = exp(dt_t A) * S_{t-1} + dt_t * x_t (outer) B_t          S [B, Hs, P, N]
    y_t = S_t . C_t                                                 y [B, Hs, P]

`ssd_scan` is the chunked algorithm of Dao & Gu (2024) as in transformers' `mamba2_chunk_scan`: within
each chunk of C tokens a masked decay matrix exp(segsum) turns the scan into attention-like matmuls
(diagonal block), the carried-in state adds its decayed read-out (off-diagonal block) and the chunk's end
state comes from one contraction; the chunks run one after another (T/C steps, not T). dt is already softplus'ed and biased; no D skip, no gate.
`ssd_step` is the decode form; `ssd_scan_reference` is the token-loop oracle of both.
"""

from __future__ import annotations

import torch

from ltmdsl.runtime.chunk_recompute import run_chunks


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _per_head(m: torch.Tensor, Hs: int) -> torch.Tensor:
    """Group-shared B or C [..., G, N] -> one copy per head [..., Hs, N]."""
    G = m.shape[-2]
    return m.repeat_interleave(Hs // G, dim=-2)


def _ssd_chunk(seq: tuple, shared: tuple, state: tuple) -> tuple[torch.Tensor, tuple]:
    """One chunk of L tokens: (x [B,L,Hs,P], dt [B,L,Hs], Bm, Cm [B,L,G,N]), (A [Hs],), (h [B,Hs,P,N],)
    -> (y [B,L,Hs,P], (h_end,)) in the work dtype (the SSD block decomposition, module docstring)."""
    x, dt, Bm, Cm = seq
    (A,), (h,) = shared, state
    work = h.dtype
    Hs, L = x.shape[2], x.shape[1]
    dtw = dt.to(work)  # [B, L, Hs]
    xdt = x.to(work) * dtw[..., None]  # [B, L, Hs, P]   dt_s * x_s
    b = _per_head(Bm.to(work), Hs)  # [B, L, Hs, N]
    c = _per_head(Cm.to(work), Hs)  # [B, L, Hs, N]
    acum = torch.cumsum(dtw * A, dim=1)  # [B, L, Hs]   cumulative log-decay a_t

    # Diagonal block: y_t = sum_{s<=t} exp(a_t - a_s) (C_t . B_s) dt_s x_s.
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()  # [L(t), L(s)]
    seg = acum[:, :, None, :] - acum[:, None, :, :]  # [B, L, L, Hs]
    scores = torch.einsum("blhn,bshn->blsh", c, b) * seg.masked_fill(~causal[None, :, :, None], float("-inf")).exp()
    del seg
    y = torch.einsum("blsh,bshp->blhp", scores, xdt)  # [B, L, Hs, P]
    del scores
    # Off-diagonal: the carried-in state, decayed to each position; then the state leaving the chunk.
    y = y + torch.einsum("blhn,bhpn->blhp", c, h) * acum.exp()[..., None]
    to_end = (acum[:, -1:] - acum).exp()  # [B, L, Hs]
    h = acum[:, -1].exp()[..., None, None] * h + torch.einsum("blhn,blh,blhp->bhpn", b, to_end, xdt)  # [B, Hs, P, N]
    return y, (h,)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    *,
    chunk: int,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan.

    x [B,T,Hs,P], dt [B,T,Hs], A [Hs] (negative), Bm, Cm [B,T,G,N], state [B,Hs,P,N] | None
    -> (y [B,T,Hs,P] in x's dtype, final_state [B,Hs,P,N] in the work dtype). Oracle: `ssd_scan_reference`.

    Chunks of C tokens run one at a time (runtime/chunk_recompute.py; a last chunk may be shorter, so no
    padding): only one chunk's [B,C,C,Hs] decay and scores are ever live, and under autograd only the inputs
    and each chunk's fp32 start state [B,Hs,P,N] are kept, the backward recomputing each chunk, as
    state-spaces/mamba's ssd_combined keeps its inputs and chunk states.
    """
    work = _work_dtype(x)
    Bsz, T, Hs, P = x.shape
    N = Bm.shape[-1]
    h = torch.zeros(Bsz, Hs, P, N, dtype=work, device=x.device) if state is None else state.to(work)
    if T == 0:
        return x.new_zeros(Bsz, 0, Hs, P), h
    y, (h,) = run_chunks(_ssd_chunk, (x, dt, Bm, Cm), (A.to(work),), (h,), chunk=chunk, out_dtype=x.dtype)
    return y, h


def ssd_step(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """One token: x [B,Hs,P], dt [B,Hs], A [Hs], Bm, Cm [B,G,N], state [B,Hs,P,N] (in place) -> y [B,Hs,P]."""
    work = _work_dtype(x)
    Hs = x.shape[1]
    dtw = dt.to(work)  # [B, Hs]
    b = _per_head(Bm.to(work), Hs)  # [B, Hs, N]
    c = _per_head(Cm.to(work), Hs)  # [B, Hs, N]
    h = state.to(work) * torch.exp(dtw * A.to(work))[..., None, None]  # [B, Hs, P, N]
    h = h + (dtw[..., None] * x.to(work))[..., None] * b[:, :, None, :]
    state.copy_(h)
    return torch.einsum("bhpn,bhn->bhp", h, c).to(x.dtype)


def ssd_scan_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    *,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-loop oracle of `ssd_scan` / `ssd_step`, computed in the inputs' dtype."""
    Bsz, T, Hs, P = x.shape
    N = Bm.shape[-1]
    b = _per_head(Bm, Hs)  # [B, T, Hs, N]
    c = _per_head(Cm, Hs)
    h = torch.zeros(Bsz, Hs, P, N, dtype=x.dtype, device=x.device) if state is None else state.clone().to(x.dtype)
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)[..., None, None]  # [B, Hs, 1, 1]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * b[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, c[:, t]))
    return torch.stack(ys, dim=1), h
