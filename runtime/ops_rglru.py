"""RG-LRU, the real-gated linear recurrent unit: the chunked parallel scan, the one-token step and the oracle.

Per channel (width W = lru_width), with the gates already computed by the layer (sigmoid of the
block-diagonal projections of x; Griffin's W_x, W_a):
    log a_t = -c * r_t * softplus(a_param)                  a_t = sigma(Lambda)^(c r_t), Lambda = -a_param
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)     h [B, W]
    y_t = h_t
with c = 8 (De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient
Language Models", section 2.4; RecurrentGemma). a_t is formed in log space and 1 - a_t^2 as -expm1(2 log a_t),
exact where a_t is close to 1. `a_param` is the checkpoint's parameter (transformers'
`RecurrentGemmaRglru.recurrent_param`), stored so that softplus(a_param) = -log sigma(Lambda).

Resets (position 0 of a document, transformers' `position_ids == 0`): at a reset the carried state is
dropped (a_t -> 0) and the input is not scaled by sqrt(1 - a_t^2), so h_t = i_t * x_t there.

`rglru_scan` (chunks of C tokens): inside a chunk, a log-depth Hillis-Steele scan over the per-token
(decay, input) pairs, (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2), which only multiplies decays in [0, 1)
and so cannot overflow; the chunks run one after another (T/C Python steps, never T).
`rglru_step` is the decode form; `rglru_scan_reference` is the token-loop oracle of both.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ltmdsl.runtime.chunk_recompute import run_chunks


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """Runs in fp32, or fp64 when given fp64 (the oracle precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _coefficients(
    x: torch.Tensor,
    gate_x: torch.Tensor,
    gate_a: torch.Tensor,
    a_param: torch.Tensor,
    reset: torch.Tensor | None,
    c: float,
    work: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of h_t = a_t h_{t-1} + b_t for inputs [..., W] and reset [...] | None, in the work dtype."""
    log_a = -c * gate_a.to(work) * F.softplus(a_param.to(work))  # [..., W]
    a = torch.exp(log_a)
    scale = torch.sqrt(-torch.expm1(2.0 * log_a))  # [..., W]   sqrt(1 - a^2)
    if reset is not None:
        r = reset[..., None]  # [..., 1]
        a = a.masked_fill(r, 0.0)
        scale = scale.masked_fill(r, 1.0)
    return a, scale * gate_x.to(work) * x.to(work)


def _rglru_chunk(seq: tuple, shared: tuple, state: tuple, *, c: float) -> tuple[torch.Tensor, tuple]:
    """One chunk of L tokens: (x, gate_x, gate_a [B,L,W], reset [B,L] | None), (a_param [W],), (h [B,W],)
    -> (h_t [B,L,W], (h_end,)) in the work dtype: the log-depth scan from the carried state."""
    x, gate_x, gate_a, reset = seq
    (a_param,), (h,) = shared, state
    L = x.shape[1]
    a, b = _coefficients(x, gate_x, gate_a, a_param, reset, c, h.dtype)  # [B, L, W]
    off = 1
    while off < L:  # after this loop a_t = prod_{s<=t} a_s and b_t = the zero-start state at t
        b = torch.cat([b[:, :off], torch.addcmul(b[:, off:], a[:, off:], b[:, :-off])], dim=1)
        a = torch.cat([a[:, :off], a[:, off:] * a[:, :-off]], dim=1)
        off *= 2
    hs = torch.addcmul(b, a, h[:, None])  # [B, L, W]   h_t including the carried-in state
    return hs, (hs[:, -1],)


def rglru_scan(
    x: torch.Tensor,
    gate_x: torch.Tensor,
    gate_a: torch.Tensor,
    a_param: torch.Tensor,
    *,
    reset: torch.Tensor | None,
    state: torch.Tensor | None,
    chunk: int = 64,
    c: float = 8.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel RG-LRU.

    x, gate_x (i_t), gate_a (r_t) [B,T,W]; a_param [W]; reset [B,T] bool | None; state [B,W] | None (zeros)
    -> (y [B,T,W] in x's dtype, final_state [B,W] in the work dtype). Oracle: `rglru_scan_reference`.

    Chunks run one at a time (runtime/chunk_recompute.py): under autograd only the inputs and each chunk's
    fp32 start state [B,W] are kept, the backward recomputing each chunk's scan.
    """
    if chunk < 1:
        raise ValueError(f"rglru_scan: chunk must be >= 1, got {chunk}")
    work = _work_dtype(x)
    Bsz, T, W = x.shape
    h = torch.zeros(Bsz, W, dtype=work, device=x.device) if state is None else state.to(work)  # [B, W]
    if T == 0:
        return x.new_zeros(Bsz, 0, W), h
    step = functools.partial(_rglru_chunk, c=c)
    y, (h,) = run_chunks(step, (x, gate_x, gate_a, reset), (a_param,), (h,), chunk=chunk, out_dtype=x.dtype)
    return y, h


def rglru_step(
    x: torch.Tensor,
    gate_x: torch.Tensor,
    gate_a: torch.Tensor,
    a_param: torch.Tensor,
    state: torch.Tensor,
    *,
    reset: torch.Tensor | None = None,
    c: float = 8.0,
) -> torch.Tensor:
    """One token: x, gate_x, gate_a [B,W]; a_param [W]; state [B,W] (updated in place); reset [B] | None
    -> y [B,W]."""
    work = _work_dtype(x)
    a, b = _coefficients(x, gate_x, gate_a, a_param, reset, c, work)  # [B, W]
    h = torch.addcmul(b, a, state.to(work))
    state.copy_(h)
    return h.to(x.dtype)


def rglru_scan_reference(
    x: torch.Tensor,
    gate_x: torch.Tensor,
    gate_a: torch.Tensor,
    a_param: torch.Tensor,
    *,
    reset: torch.Tensor | None,
    state: torch.Tensor | None,
    c: float = 8.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-loop oracle of `rglru_scan` / `rglru_step`, computed in the inputs' dtype, straight from the
    paper's form: a = sigma(Lambda)^(c r) with Lambda = -a_param, h = a h + sqrt(1 - a^2) (i x)."""
    Bsz, T, W = x.shape
    h = torch.zeros(Bsz, W, dtype=x.dtype, device=x.device) if state is None else state.clone().to(x.dtype)
    base = torch.sigmoid(-a_param.to(x.dtype))  # [W]   sigma(Lambda)
    ys = []
    for t in range(T):
        a = base ** (c * gate_a[:, t])  # [B, W]
        scale = torch.sqrt(1 - a * a)
        if reset is not None:
            at_reset = reset[:, t, None]  # [B, 1]
            a = torch.where(at_reset, torch.zeros_like(a), a)
            scale = torch.where(at_reset, torch.ones_like(scale), scale)
        h = a * h + scale * gate_x[:, t] * x[:, t]
        ys.append(h)
    return torch.stack(ys, dim=1), h
