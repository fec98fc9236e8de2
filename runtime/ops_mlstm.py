"""mLSTM, xLSTM's matrix-memory cell: the chunked parallel form, the one-token step and the token-loop oracle.

Per head, with an exponential input gate (log i_t = i_gate_t, the gate's pre-activation) and a forget
gate given in log space (log f_t = log_f_t: logsigmoid of the pre-activation for xLSTM-7B's sigmoid
forget gate, the pre-activation itself for an exponential one), kept stabilised by the running max m:
    m_t = max(log_f_t + m_{t-1}, i_gate_t)                                  m [B, H]
    C_t = exp(log_f_t + m_{t-1} - m_t) C_{t-1} + exp(i_gate_t - m_t) k_t (outer) v_t    C [B, H, D, Dv]
    n_t = exp(log_f_t + m_{t-1} - m_t) n_{t-1} + exp(i_gate_t - m_t) k_t                n [B, H, D]
    h_t = (q~_t . C_t) / (max(|q~_t . n_t|, exp(-m_t)) + eps),   q~_t = scale * q_t     h [B, H, Dv]
(Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", the mLSTM cell; the stabilised form and the
max(|.|, exp(-m)) + eps denominator of xLSTM-7B, Beck et al. 2025, "xLSTM 7B: A Recurrent LLM for Fast and
Efficient Inference", and its kernels "Tiled Flash Linear Attention"). C and n are stored divided by
exp(m): the true memory is exp(m) C. The empty state is C = 0, n = 0, m = 0, as in the xLSTM kernels;
m is part of the state's meaning, since eps is added to the denominator at the scale exp(-m).
Since m_t >= i_gate_t, exp(-m_t) stays finite in fp32 while the input gate is above -88 (soft-capped
gates are above -15).
scale defaults to D^-1/2. Gate soft-capping (xLSTM-7B: 15 tanh(x / 15) on both pre-activations), the
output gate and the per-head norm are the layer's work.

`mlstm_chunked` (chunks of C tokens): with b_t the in-chunk cumulative log forget gate, every weight is
exp(log-weight - m_t) with m_t = max(b_t + m_0, max_{j<=t} (b_t - b_j + i_gate_j)) -- exactly the
recurrent m_t, since max and + commute -- so every exponent is <= 0 and the result equals the recurrence,
eps included. Inside a chunk: an attention-like masked product; the chunk's own contribution to its end
state is one contraction, stabilised by its own max; the chunks run one after another (T/C Python steps,
never T). `mlstm_step` is the decode form; `mlstm_reference` is the token-loop oracle
of both.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ltmdsl.runtime.chunk_recompute import run_chunks


class MlstmState(NamedTuple):
    """The stabilised mLSTM state of one layer: C [B,H,D,Dv], n [B,H,D], m [B,H]."""

    C: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor


def mlstm_empty_state(
    batch: int, heads: int, dk: int, dv: int, *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> MlstmState:
    """The state before any token: zeros, with m = 0 (the xLSTM kernels' convention)."""
    return MlstmState(
        torch.zeros(batch, heads, dk, dv, dtype=dtype, device=device),
        torch.zeros(batch, heads, dk, dtype=dtype, device=device),
        torch.zeros(batch, heads, dtype=dtype, device=device),
    )


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """Runs in fp32, or fp64 when given fp64 (the oracle precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _mlstm_chunk(seq: tuple, shared: tuple, state: tuple, *, scale: float, eps: float) -> tuple[torch.Tensor, tuple]:
    """One chunk of L tokens: (q, k [B,L,H,D], v [B,L,H,Dv], i_gate, log_f [B,L,H]), (), (C, n, m)
    -> (h [B,L,H,Dv], (C, n, m) leaving the chunk), in the work dtype (module docstring's chunked form)."""
    q, k, v, i_gate, log_f = seq
    C0, n0, m0 = state  # [B, H, D, Dv], [B, H, D], [B, H]
    work = C0.dtype
    L = q.shape[1]
    qc = (q.to(work) * scale).transpose(1, 2)  # [B, H, L, D]
    kc, vc = k.to(work).transpose(1, 2), v.to(work).transpose(1, 2)  # [B, H, L, D|Dv]
    ic = i_gate.to(work).transpose(1, 2)  # [B, H, L]
    bc = torch.cumsum(log_f.to(work).transpose(1, 2), dim=-1)  # [B, H, L]   b_t = sum of log f up to t

    # Log-weight of token j in the output at t (j <= t): b_t - b_j + i_gate_j.
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()  # [L(t), L(j)]
    logw = (bc[..., :, None] - bc[..., None, :] + ic[..., None, :]).masked_fill(~causal, float("-inf"))  # [B,H,L,L]
    m = torch.maximum(bc + m0[..., None], logw.amax(dim=-1))  # [B, H, L]   the recurrent m_t
    w_start = torch.exp(bc + m0[..., None] - m)  # [B, H, L]
    scores = (qc @ kc.transpose(-1, -2)) * torch.exp(logw - m[..., None])  # [B, H, L, L]
    del logw
    num = w_start[..., None] * (qc @ C0) + scores @ vc  # [B, H, L, Dv]
    den = w_start * torch.einsum("bhtd,bhd->bht", qc, n0) + scores.sum(dim=-1)  # [B, H, L]
    del scores
    h = (num / (torch.maximum(den.abs(), torch.exp(-m)) + eps)[..., None]).transpose(1, 2)  # [B, L, H, Dv]

    # The chunk's own contribution to its end state, stabilised by its own max A, then the carried state.
    a = bc[..., -1:] - bc + ic  # [B, H, L]
    A = a.amax(dim=-1)  # [B, H]
    wa = torch.exp(a - A[..., None])  # [B, H, L]
    b_end = bc[..., -1]  # [B, H]
    m_new = torch.maximum(b_end + m0, A)  # [B, H]
    carry, own = torch.exp(b_end + m0 - m_new), torch.exp(A - m_new)  # [B, H]
    C1 = carry[..., None, None] * C0 + own[..., None, None] * torch.einsum("bhj,bhjd,bhjv->bhdv", wa, kc, vc)
    n1 = carry[..., None] * n0 + own[..., None] * torch.einsum("bhj,bhjd->bhd", wa, kc)  # [B, H, D]
    return h, (C1, n1, m_new)


def mlstm_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_gate: torch.Tensor,
    log_f: torch.Tensor,
    *,
    chunk: int,
    state: MlstmState | None,
    scale: float | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MlstmState]:
    """Chunked parallel mLSTM.

    q, k [B,T,H,D]; v [B,T,H,Dv]; i_gate, log_f [B,T,H]; state MlstmState | None (the empty state)
    -> (h [B,T,H,Dv] in q's dtype, final MlstmState in the work dtype). Oracle: `mlstm_reference`.

    Chunks run one at a time (runtime/chunk_recompute.py; a last chunk may be shorter, so no padding): one
    chunk's [B,H,L,L] log-weights and scores are live at a time, and under autograd only the inputs and
    each chunk's fp32 start state (C, n, m) are kept, the backward recomputing each chunk (as the xLSTM
    kernels keep their inputs and chunk states).
    """
    if chunk < 1:
        raise ValueError(f"mlstm_chunked: chunk must be >= 1, got {chunk}")
    work = _work_dtype(q)
    Bsz, T, H, D = q.shape
    Dv = v.shape[-1]
    scale = D**-0.5 if scale is None else scale
    if state is None:
        state = mlstm_empty_state(Bsz, H, D, Dv, dtype=work, device=q.device)
    start = tuple(s.to(work) for s in state)
    if T == 0:  # an empty prefill leaves the state as it was
        return q.new_zeros(Bsz, 0, H, Dv), MlstmState(*start)
    step = functools.partial(_mlstm_chunk, scale=scale, eps=eps)
    h, last = run_chunks(step, (q, k, v, i_gate, log_f), (), start, chunk=chunk, out_dtype=q.dtype)
    return h, MlstmState(*last)


def mlstm_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_gate: torch.Tensor,
    log_f: torch.Tensor,
    state: MlstmState,
    *,
    scale: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """One token: q, k [B,H,D]; v [B,H,Dv]; i_gate, log_f [B,H]; state (C, n, m updated in place)
    -> h [B,H,Dv]."""
    work = _work_dtype(q)
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    C, n, m = (s.to(work) for s in state)
    ig, lf = i_gate.to(work), log_f.to(work)  # [B, H]
    m_new = torch.maximum(lf + m, ig)  # [B, H]
    f_act, i_act = torch.exp(lf + m - m_new), torch.exp(ig - m_new)
    kw, vw, qs = k.to(work), v.to(work), q.to(work) * scale
    C = f_act[..., None, None] * C + i_act[..., None, None] * kw[..., :, None] * vw[..., None, :]  # [B, H, D, Dv]
    n = f_act[..., None] * n + i_act[..., None] * kw  # [B, H, D]
    num = torch.einsum("bhd,bhdv->bhv", qs, C)  # [B, H, Dv]
    den = torch.maximum(torch.einsum("bhd,bhd->bh", qs, n).abs(), torch.exp(-m_new)) + eps  # [B, H]
    for dst, src in zip(state, (C, n, m_new)):
        dst.copy_(src)
    return (num / den[..., None]).to(q.dtype)


def mlstm_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_gate: torch.Tensor,
    log_f: torch.Tensor,
    *,
    state: MlstmState | None,
    scale: float | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MlstmState]:
    """Token-loop oracle of `mlstm_chunked` / `mlstm_step`, computed in the inputs' dtype, the recurrence
    exactly as written in the module docstring."""
    Bsz, T, H, D = q.shape
    Dv = v.shape[-1]
    scale = D**-0.5 if scale is None else scale
    if state is None:
        state = mlstm_empty_state(Bsz, H, D, Dv, dtype=q.dtype, device=q.device)
    C, n, m = (s.clone().to(q.dtype) for s in state)
    hs = []
    for t in range(T):
        m_new = torch.maximum(log_f[:, t] + m, i_gate[:, t])  # [B, H]
        f_act = torch.exp(log_f[:, t] + m - m_new)
        i_act = torch.exp(i_gate[:, t] - m_new)
        C = f_act[..., None, None] * C + i_act[..., None, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        n = f_act[..., None] * n + i_act[..., None] * k[:, t]
        m = m_new
        qs = q[:, t] * scale  # [B, H, D]
        num = torch.einsum("bhd,bhdv->bhv", qs, C)
        den = torch.maximum(torch.einsum("bhd,bhd->bh", qs, n).abs(), torch.exp(-m)) + eps
        hs.append(num / den[..., None])
    return torch.stack(hs, dim=1), MlstmState(C, n, m)

