"""The gated delta rule (Gated DeltaNet, and KDA's per-channel form): chunked form, one-token step, oracle.

Per value head h, with key head h // (Hv / Hk) supplying q_t and k_t (each key head serves Hv / Hk
consecutive value heads), state S [Dk, Dv]:
    S  <- diag(exp(g_t)) S                           decay first (a per-head scalar, or one per key channel)
    d_t = beta_t * (v_t - S^T k_t)                   the delta-rule correction, after the decay
    S  <- S + k_t d_t^T
    o_t = S^T q_t                                    o [B, T, Hv, Dv]
q_t and k_t are optionally L2-normalised (x / sqrt(sum x^2 + 1e-6), as flash-linear-attention does), then
q_t is scaled by `scale` (default Dk^-0.5).

Two decays, one rule:
- Gated DeltaNet (Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule",
  ICLR 2025; Qwen3-Next, Qwen3.5): g [B, T, Hv], one log-decay <= 0 per token and value head.
- KDA, Kimi Delta Attention (Kimi Team, "Kimi Linear: An Expressive, Efficient Attention Architecture",
  2025): g [B, T, Hv, Dk], one log-decay <= 0 per key channel: row c of S decays by exp(g_t[c]).
With decay 1 (g = 0) both reduce to DeltaNet (Yang et al., "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length", NeurIPS 2024), whose chunked form is used here.

`gated_delta_chunked`, the WY / UT-transform form. Inside a chunk of C tokens, with gamma_r the cumulative
log-decay from the chunk start to position r (a vector over Dk for KDA) and S0 the chunk's start state,
unrolling the recurrence gives, for the corrections D = [d_1 .. d_C] [C, Dv]:
    (I + L) D = beta * (V - Kg S0),     L[r, s] = beta_r sum_c k_r[c] k_s[c] exp(gamma_r[c] - gamma_s[c]), s < r
where Kg has rows k_r * exp(gamma_r). L is strictly lower triangular, so one unit-lower-triangular solve per
chunk (the UT transform of Joffrain et al. 2006, a compact WY representation) gives U = (I + L)^-1 (beta V)
and W = (I + L)^-1 (beta Kg), and D = U - W S0. Then
    o_r  = S0^T (q_r * exp(gamma_r)) + sum_{s <= r} Q[r, s] d_s
    S_C  = exp(gamma_C) * S0 + sum_s (k_s * exp(gamma_C - gamma_s)) d_s^T
with Q[r, s] = sum_c q_r[c] k_s[c] exp(gamma_r[c] - gamma_s[c]).
Every exponent is <= 0, so nothing overflows whatever the decay. The chunks run one at a time
(`ops_recurrence`: a loop of T / C steps, never T, the last chunk possibly shorter): one chunk's fp32
terms exist at a time, each chunk's output is written into the output as it is made, and under autograd
only q, k, v, g, beta and the given state are saved, the backward recomputing the chunk states and each
chunk's terms (as flash-linear-attention's chunk kernels do). The scalar decay keeps its decay matrix
[C, C]; the per-channel one takes exact [SUB, SUB, Dk] decays on the diagonal and matmuls below it (see
`_decayed_scores_per_channel`).

One chunk's fp32 working set (q and k per value head, v, beta, the cumulative log-decay, the score matrices,
[U | W], the corrections, the read-out, three states) does not grow with T; ltmdsl/kinds/gated_deltanet.py
counts it term by term for the prefill workspace.

`gated_delta_step` is the decode form (one token, state updated in place); `gated_delta_reference` is the
token-loop oracle of both (the plain recurrence above, in the inputs' dtype). The tests also hold these
to transformers' chunked and recurrent gated delta rule (qwen3_next) and KDA (kimi_linear) functions.
"""

from __future__ import annotations

import functools

import torch

from ltmdsl.runtime import ops_recurrence

L2NORM_EPS = 1e-6  # flash-linear-attention's (and transformers') l2norm epsilon, added to the squared norm
SUB = 16  # row block of the per-channel decay: its exact decay tensor is [SUB, SUB, Dk]


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """The rule runs in fp32, or fp64 when given fp64 (the oracle precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> None:
    """q, k [..., Hk, Dk], v [..., Hv, Dv], g [..., Hv] or [..., Hv, Dk], beta [..., Hv]: one clear error if not."""
    lead, (Hk, Dk), Hv = v.shape[:-2], q.shape[-2:], v.shape[-2]
    problems = []
    if k.shape != q.shape:
        problems.append(f"k {tuple(k.shape)} must have q's shape {tuple(q.shape)}")
    if q.shape[:-2] != lead:
        problems.append(f"q {tuple(q.shape)} and v {tuple(v.shape)} disagree before the head axis")
    if Hv % Hk:
        problems.append(f"value heads Hv={Hv} must be a multiple of key heads Hk={Hk}")
    if g.shape not in (lead + (Hv,), lead + (Hv, Dk)):
        per_head, per_channel = tuple(lead + (Hv,)), tuple(lead + (Hv, Dk))
        problems.append(f"g {tuple(g.shape)} must be {per_head} (per head) or {per_channel} (per channel)")
    if beta.shape != lead + (Hv,):
        problems.append(f"beta {tuple(beta.shape)} must be {tuple(lead + (Hv,))}")
    if problems:
        raise ValueError("gated delta rule: " + "; ".join(problems))


def _prepare_qk(
    q: torch.Tensor, k: torch.Tensor, Hv: int, *, l2norm: bool, scale: float | None, work: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [..., Hk, Dk] -> per value head [..., Hv, Dk] in the work dtype, optionally L2-normalised, q scaled."""
    q, k = q.to(work), k.to(work)
    if l2norm:
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + L2NORM_EPS)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + L2NORM_EPS)
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    group = Hv // q.shape[-2]  # value heads per key head
    return q.repeat_interleave(group, dim=-2), k.repeat_interleave(group, dim=-2)


def _decayed_scores(a: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """sum_c a_r[c] b_s[c] exp(gamma_r[c] - gamma_s[c]) on the causal (r, s) pairs, 0 elsewhere.

    a [(A,) ..., C, Dk] (a leading axis A scores several a against one b, sharing the decay); b [..., C, Dk];
    gamma [..., C] (scalar decay) or [..., C, Dk] (per channel); causal [C, C] bool -> [(A,) ..., C, C].
    Only exponents <= 0 are ever taken (gamma never increases along a chunk).
    """
    if gamma.dim() == b.dim() - 1:  # scalar decay per head: a [C, C] decay matrix
        seg = gamma[..., :, None] - gamma[..., None, :]  # [..., C, C]
        decay = seg.masked_fill(~causal, float("-inf")).exp()
        return (a @ b.transpose(-1, -2)) * decay
    return _decayed_scores_per_channel(a, b, gamma, causal)


def _decayed_scores_per_channel(
    a: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor, causal: torch.Tensor
) -> torch.Tensor:
    """`_decayed_scores` for a decay per channel, by blocks of SUB rows.

    The diagonal blocks take the exact [SUB, SUB, Dk] decay tensor. Below them, for rows r of a block starting
    at i and every column s < i, the decay factors through the last position before the block,
    exp(gamma_r - gamma_s) = exp(gamma_r - gamma_{i-1}) exp(gamma_{i-1} - gamma_s), both exponents <= 0: one
    matmul per block, and [C, SUB, Dk] work instead of [C, C, Dk].
    """
    C = a.shape[-2]
    out = a.new_zeros(*a.shape[:-1], C)  # [..., C, C]
    for i in range(0, C, SUB):
        rows = slice(i, min(i + SUB, C))
        seg = gamma[..., rows, None, :] - gamma[..., None, rows, :]  # [..., sub, sub, Dk]
        decay = seg.masked_fill_(~causal[rows, rows, None], float("-inf")).exp_()  # in place: one such tensor
        out[..., rows, rows] = torch.einsum("...rc,...sc,...rsc->...rs", a[..., rows, :], b[..., rows, :], decay)
        del seg, decay
        if i > 0:
            pivot = gamma[..., i - 1 : i, :]  # [..., 1, Dk]   log-decay at the last position before the block
            left = a[..., rows, :] * (gamma[..., rows, :] - pivot).exp()  # [..., sub, Dk]
            right = b[..., :i, :] * (pivot - gamma[..., :i, :]).exp()  # [..., i, Dk]
            out[..., rows, :i] = left @ right.transpose(-1, -2)
            del left, right
    return out


def _within_chunks(
    qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, bc: torch.Tensor, gamma: torch.Tensor, causal: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Everything a group of n chunks needs before the state arrives, batched over the group.

    qc, kc [B,Hv,n,C,Dk]; vc [B,Hv,n,C,Dv]; bc [B,Hv,n,C,1]; gamma [B,Hv,n,C] or [B,Hv,n,C,Dk]; causal [C,C]
    -> u [B,Hv,n,C,Dv], w [B,Hv,n,C,Dk] (the UT transform), intra [B,Hv,n,C,C] (Q[r, s]),
       q_in, k_out [B,Hv,n,C,Dk] (queries reading, keys writing the carried state), end_decay [B,Hv,n,1|Dk,1].
    """
    Dv = vc.shape[-1]
    gamma_k = gamma[..., None] if gamma.dim() == qc.dim() - 1 else gamma  # [B, Hv, n, C, 1 | Dk]
    gamma_end = gamma_k[:, :, :, -1:]  # [B, Hv, n, 1, 1 | Dk]

    # The UT transform: (I + L) [U | W] = [beta V | beta Kg], one unit-lower-triangular solve per chunk.
    eye = torch.eye(causal.shape[0], dtype=qc.dtype, device=qc.device)
    kk, intra = _decayed_scores(torch.stack([kc, qc]), kc, gamma, causal)  # [B, Hv, n, C, C] each, one decay
    lower = bc * kk.masked_fill(~causal.tril(-1), 0.0)  # [B, Hv, n, C, C]   L[r, s], s < r
    rhs = torch.cat([bc * vc, bc * kc * gamma_k.exp()], dim=-1)  # [B, Hv, n, C, Dv + Dk]
    uw = torch.linalg.solve_triangular(eye + lower, rhs, upper=False, unitriangular=True)
    u, w = uw.split([Dv, qc.shape[-1]], dim=-1)  # [B, Hv, n, C, Dv], [B, Hv, n, C, Dk]
    # intra [B, Hv, n, C, C] is Q[r, s], s <= r
    q_in = qc * gamma_k.exp()  # [B, Hv, n, C, Dk]
    k_out = kc * (gamma_end - gamma_k).exp()  # [B, Hv, n, C, Dk]
    end_decay = gamma_end.exp().transpose(-1, -2)  # [B, Hv, n, 1 | Dk, 1]
    return u, w, intra, q_in, k_out, end_decay


def _chunk_step(
    s: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *,
    l2norm: bool, scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of n <= C tokens from its start state: the UT transform, the read-out and the next state.

    s [B,Hv,Dk,Dv] (work dtype); q, k [B,n,Hk,Dk]; v [B,n,Hv,Dv]; g [B,n,Hv(,Dk)]; beta [B,n,Hv]
    -> (o [B,n,Hv,Dv] in the work dtype, the state after the chunk [B,Hv,Dk,Dv]).
    """
    work, n = s.dtype, v.shape[1]
    qh, kh = _prepare_qk(q, k, v.shape[2], l2norm=l2norm, scale=scale, work=work)  # [B, n, Hv, Dk]

    def heads_first(t: torch.Tensor) -> torch.Tensor:
        """[B, n, Hv, ...] -> [B, Hv, 1, n, ...] in the work dtype (one chunk of a group of one)."""
        return t.to(work).transpose(1, 2).unsqueeze(2)

    causal = torch.ones(n, n, dtype=torch.bool, device=s.device).tril()  # [n(r), n(s)]
    gamma = torch.cumsum(heads_first(g), dim=3)  # [B, Hv, 1, n(, Dk)]   cumulative log-decay
    u, w, intra, q_in, k_out, end_decay = _within_chunks(
        heads_first(qh), heads_first(kh), heads_first(v), heads_first(beta)[..., None], gamma, causal
    )
    d = u[:, :, 0] - w[:, :, 0] @ s  # [B, Hv, n, Dv]   the corrections d_r
    o = q_in[:, :, 0] @ s + intra[:, :, 0] @ d  # [B, Hv, n, Dv]
    nxt = end_decay[:, :, 0] * s  # [B, Hv, Dk, Dv]
    nxt += k_out[:, :, 0].transpose(-1, -2) @ d  # in place: three states live at most (s, nxt, the product)
    return o.transpose(1, 2), nxt


def gated_delta_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    chunk: int,
    state: torch.Tensor | None,
    l2norm: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule (WY / UT transform per chunk, one pass over chunks carrying the state).

    q, k [B,T,Hk,Dk]; v [B,T,Hv,Dv]; g [B,T,Hv] (Gated DeltaNet) or [B,T,Hv,Dk] (KDA), log-decays <= 0;
    beta [B,T,Hv]; state [B,Hv,Dk,Dv] | None (zeros); any chunk >= 1 (T need not be a multiple)
    -> (o [B,T,Hv,Dv] in q's dtype, final_state [B,Hv,Dk,Dv] in the work dtype). Oracle: `gated_delta_reference`.
    Chunk by chunk (`ops_recurrence.chunked`): the output is written as each chunk is done, and under
    autograd only q, k, v, g, beta and the given state are saved; backward recomputes the rest.
    """
    _check_shapes(q, k, v, g, beta)
    if chunk < 1:
        raise ValueError(f"gated delta rule: chunk must be >= 1, got {chunk}")
    work = _work_dtype(q)
    Bsz, T, Hv, Dv = v.shape
    Dk = q.shape[-1]
    zeros = functools.partial(torch.zeros, Bsz, Hv, Dk, Dv, dtype=work, device=q.device)  # [B, Hv, Dk, Dv]

    if T == 0:  # an empty prefill leaves the state as it was
        return v.new_zeros(Bsz, 0, Hv, Dv, dtype=q.dtype), zeros() if state is None else state.to(work)
    step = functools.partial(_chunk_step, l2norm=l2norm, scale=scale)
    return ops_recurrence.chunked(step, chunk, None if state is None else state.to(work), (q, k, v, g, beta),
                                  out=(Hv, Dv), out_dtype=q.dtype, new_state=zeros)


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    l2norm: bool,
    scale: float | None,
) -> torch.Tensor:
    """One token: q, k [B,Hk,Dk]; v [B,Hv,Dv]; g [B,Hv] or [B,Hv,Dk]; beta [B,Hv];
    state [B,Hv,Dk,Dv] (updated in place) -> o [B,Hv,Dv] in q's dtype. Oracle: `gated_delta_reference`."""
    _check_shapes(q, k, v, g, beta)
    work = _work_dtype(q)
    Hv = v.shape[1]
    qh, kh = _prepare_qk(q, k, Hv, l2norm=l2norm, scale=scale, work=work)  # [B, Hv, Dk]
    decay = g.to(work).exp()  # [B, Hv] or [B, Hv, Dk]
    decay = decay[..., None, None] if g.dim() == 2 else decay[..., None]  # [B, Hv, 1 | Dk, 1]
    s = state.to(work) * decay  # [B, Hv, Dk, Dv]
    d = beta.to(work)[..., None] * (v.to(work) - torch.einsum("bhkv,bhk->bhv", s, kh))  # [B, Hv, Dv]
    s = s + kh[..., None] * d[..., None, :]
    state.copy_(s)
    return torch.einsum("bhkv,bhk->bhv", s, qh).to(q.dtype)


def gated_delta_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    state: torch.Tensor | None,
    l2norm: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-loop oracle of `gated_delta_chunked` / `gated_delta_step`, computed in the inputs' dtype.

    Same arguments as `gated_delta_chunked` minus `chunk`; returns (o [B,T,Hv,Dv], final_state [B,Hv,Dk,Dv]).
    """
    _check_shapes(q, k, v, g, beta)
    Bsz, T, Hv, Dv = v.shape
    Hk, Dk = q.shape[-2:]
    if l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + L2NORM_EPS)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + L2NORM_EPS)
    q = q * (Dk**-0.5 if scale is None else scale)
    kv_head = torch.arange(Hv, device=v.device) // (Hv // Hk)  # [Hv]   the key head serving each value head
    q, k = q[:, :, kv_head], k[:, :, kv_head]  # [B, T, Hv, Dk]
    a = g.exp()  # [B, T, Hv] or [B, T, Hv, Dk]
    a = a[..., None, None] if g.dim() == 3 else a[..., None]  # [B, T, Hv, 1 | Dk, 1]
    s = torch.zeros(Bsz, Hv, Dk, Dv, dtype=v.dtype, device=v.device) if state is None else state.clone().to(v.dtype)
    outs = []
    for t in range(T):
        s = a[:, t] * s  # [B, Hv, Dk, Dv]   decay first
        d = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", s, k[:, t]))  # [B, Hv, Dv]
        s = s + k[:, t, :, :, None] * d[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", s, q[:, t]))  # [B, Hv, Dv]
    return torch.stack(outs, dim=1), s
