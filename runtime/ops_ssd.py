"""Mamba-2 state-space duality (SSD): the chunked scan, the one-token step and the token-loop oracle.

Per head h (scalar decay a = dt * A[h]), with group g(h) = h // (Hs / G) supplying B and C:
    S_t = exp(dt_t A) * S_{t-1} + dt_t * x_t (outer) B_t          S [B, Hs, P, N]
    y_t = S_t . C_t                                                 y [B, Hs, P]

`ssd_scan` is the chunked algorithm of Dao & Gu (2024) as in transformers' `mamba2_chunk_scan`: within
each chunk of C tokens a masked decay matrix exp(segsum) turns the scan into attention-like matmuls
(diagonal blocks); each chunk's end state comes from one contraction; chunk start states are passed along
a loop over chunks (T/C steps, not T). dt is already softplus'ed and biased; no D skip, no gate.
`ssd_step` is the decode form; `ssd_scan_reference` is the token-loop oracle of both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _per_head(m: torch.Tensor, Hs: int) -> torch.Tensor:
    """Group-shared B or C [..., G, N] -> one copy per head [..., Hs, N]."""
    G = m.shape[-2]
    return m.repeat_interleave(Hs // G, dim=-2)


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
    """
    work = _work_dtype(x)
    Bsz, T, Hs, P = x.shape
    N = Bm.shape[-1]
    C = chunk
    pad = (C - T % C) % C  # zero padding: dt = 0 leaves the state untouched
    nc = (T + pad) // C

    def chunks(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(Bsz, nc, C, *t.shape[2:])

    dtw = chunks(dt.to(work))  # [B, nc, C, Hs]
    xdt = chunks(x.to(work)) * dtw[..., None]  # [B, nc, C, Hs, P]   dt_s * x_s
    b = chunks(_per_head(Bm.to(work), Hs))  # [B, nc, C, Hs, N]
    c = chunks(_per_head(Cm.to(work), Hs))  # [B, nc, C, Hs, N]
    acum = torch.cumsum(dtw * A.to(work), dim=2)  # [B, nc, C, Hs]   cumulative log-decay a_t

    # Diagonal blocks: y_t += sum_{s<=t} exp(a_t - a_s) (C_t . B_s) dt_s x_s.
    causal = torch.ones(C, C, dtype=torch.bool, device=x.device).tril()  # [C(t), C(s)]
    seg = acum[:, :, :, None, :] - acum[:, :, None, :, :]  # [B, nc, C, C, Hs]
    decay = seg.masked_fill(~causal[None, None, :, :, None], float("-inf")).exp()
    scores = torch.einsum("bclhn,bcshn->bclsh", c, b) * decay  # [B, nc, C, C, Hs]
    y = torch.einsum("bclsh,bcshp->bclhp", scores, xdt)  # [B, nc, C, Hs, P]

    # Each chunk's own contribution to its end state, then the start state of every chunk.
    to_end = (acum[:, :, -1:] - acum).exp()  # [B, nc, C, Hs]
    contrib = torch.einsum("bclhn,bclh,bclhp->bchpn", b, to_end, xdt)  # [B, nc, Hs, P, N]
    chunk_decay = acum[:, :, -1].exp()  # [B, nc, Hs]
    h = torch.zeros(Bsz, Hs, P, N, dtype=work, device=x.device) if state is None else state.to(work)
    starts = []
    for k in range(nc):
        starts.append(h)
        h = chunk_decay[:, k, :, None, None] * h + contrib[:, k]  # [B, Hs, P, N]
    start = torch.stack(starts, dim=1)  # [B, nc, Hs, P, N]

    # Off-diagonal blocks: the carried-in state, decayed to each position.
    y = y + torch.einsum("bclhn,bchpn->bclhp", c, start) * acum.exp()[..., None]
    y = y.reshape(Bsz, nc * C, Hs, P)[:, :T]  # [B, T, Hs, P]
    return y.to(x.dtype), h


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
