"""xLSTM-7B's mLSTM layer (Beck et al. 2025, "xLSTM 7B: A Recurrent LLM for Fast and Efficient Inference";
the mLSTM cell of Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory"; transformers' xLSTMLayer with
weight_mode "single"): its IR config and every pure facet.

The layer (H heads; Qk = `qk_dim` total, Dqk = Qk/H per head; V = `v_dim`, Dv = V/H):
    q, k = q(u), k(u) [Qk];  v = v(u) [V];  o = ogate_preact(u) [V]           (+bias with `bias`)
    i = cap(igate_preact(u)), f = cap(fgate_preact(u)) [H]   cap(x) = s tanh(x/s), s = `soft_cap` (gates
                                                             always have biases)
    h = mLSTM(q, k, v, i, log sigmoid(f))                    stabilised matrix memory, q scaled by Dqk^-1/2
    out = out_proj(sigmoid(o) * LayerNorm_per_head(h))       norm weight [V] (+bias with `bias`)

Parameters: 2dQk + 2dV + 2(dH + H) + V d + V, plus 2Qk + 2V + V + d with bias.
Recurrent state per sub-layer on one GPU (b = ceil(B/dp), state dtype s_bytes, constant in T):
    C  b * H/t * Dqk * Dv * s_bytes      n  b * H/t * Dqk * s_bytes      m  b * H/t * s_bytes
Prefill workspace for a chunk of Cc = min(C, T) tokens (tok = b * Cc/c, H' = H/t, S = Dqk Dv + Dqk + 1 values
of state per head), as the runtime holds it (traced by `ltmdsl memory --measure`): q, k, v, o, the gate
pre-activations and h a * tok * (2Qk + 3V + 2H)/t and the fp32 gates 8 * tok * H' throughout, then the larger
of two moments:
    scan   one chunk of L = min(chunk, Cc/c) tokens: the state's fp32 copy, the chunk's own contribution
           and the state leaving it 12 * b * H' * S; fp32 q, k, v, q.C, the numerator and h of the chunk
           4 * b * L * (2Qk + 4V)/t; log-weights, scores and their weights 16 * b * H' * L^2
    norm   sigmoid(o) a * tok * V/t, the per-head LayerNorm's two fp32 working copies 8 * tok * V/t and the
           final state 4 * b * H' * S
Training activations per micro-batch (the runtime's chunked mLSTM keeps its inputs and recomputes the fp32
gates, the recurrence, the norm and the output gate in backward, as the xLSTM kernels keep their inputs):
    replicated  the pre-norm and the norm output fed to the projections (`MicroBatch.base`)
    split       q, k, v, o, the two gate pre-activations and out_proj's input a*sb*(2Qk + 3V + 2H); no
                chunk state is kept
    Selective recompute drops nothing more: the runtime recomputes the cell's internals under every policy.
    Context parallel (c > 1, the runtime's cp_forward, the same recompute regions as one process; S values of
    state per head as above): the memory entering each of the rank's p pieces (p = 2 under the balanced
    split, 1 contiguous), 4*b*p*H'*S (fp32 C, n, m), is the last region's input; the composition over the
    ranks keeps the memory entering each chunk before the rank's last one (the last rank's last chunk is c
    under the balanced split, c - 1 contiguous), 4*b*H'*S each, and every chunk's gathered own memory and
    total forget gate, 4*b*n*H'*(S + 1) (n = 2c or c chunks). Until this convention the form kept the fp32
    gates, the norm's work and the chunks' start states, +24% over a rank's activations at cp = 2, uncounted.
FLOPs beyond the parameters' 2 per token: a step costs 5H Dqk Dv + 5H Dqk (decay and update of C and n,
read-out of both); prefill in chunks of L = min(chunk, T) costs per token 2L H (Dqk + Dv) (in-chunk
products) + 4H Dqk Dv + 4H Dqk (inter-chunk read-out and the chunk's own contribution), plus
2H (Dqk Dv + Dqk) per chunk for the carried state.
Backward (the `backward` facet: what one sub-layer's backward holds at its peak beyond `stored` and its output's
gradient; r = b*p rows, b under one process, the rank's p pieces folded into the batch under cp, of s/p tokens,
L = min(chunk, s/p), n = ceil(s/(p*chunk)) chunks a row; A = a*tok*V/t, F = 4*tok*V/t, g = 4*tok*H/t; one fp32
state St = 4*r*H/t*(Dqk*Dv + Dqk + 1); a chunk's fp32 Q = 4*r*H/t*L^2, Xk = 4*r*H/t*L*Dqk, Xv = 4*r*H/t*L*Dv).
The `recompute` region's backward re-runs its function under autograd: throughout, the fp32 gates (i and f cast,
tanh, the capped values, logsigmoid's output and buffer) 6g and the chunk op's saved start states n*St; then the
larger of two moments:
    norm   the per-head norm back-propagating: its centred input and five fp32 gradients 6F; the region's output
           (held by the re-run), sigmoid(o), the normalised value's gradient and out_proj's input gradient 4A
    chunk  the last chunk re-run and differentiated (runtime/chunk_recompute.py `_ChunkRecompute.backward`):
           the region's output, out_proj's input gradient, h's and o's gradients 4A; the op's input gradients
           a*tok*(2Qk + V)/t + 2g and the final state's zero gradient St; the chunk's graph (runtime/ops_mlstm.py
           `_mlstm_chunk`): log-weights, q.k, their exp and the scores 4Q, q and k copied contiguous for q.k, q
           for q.C and for the denominator 4Xk, v's copy, q.C, the numerator and h 4Xv, h's gradient in fp32 Xv
           and the state leaving the chunk with the state entering it 2St; then the larger of the score
           gradient's moment Q + 2Xv + Xk (the scores' gradient, v's and q.C's, q's) and the division's 6Xv
           (the quotient's gradient, its transposed copy and the division's own transients).
Derived from the runtime code and checked per tensor on the trace's peak; traced within 2% at cp 2 and
tp 2 x cp 2 x sp (chunk 16 to 64, d_model 64, value widths 64 and 128); on one process the prediction is 2.6
to 5.3% over the trace (the norm's moment: out_proj's input, counted in `stored`, is freed by then). Until
this convention the chunk's graph was not counted (a cp rank's peak +18.6% at cp 2 without recompute, +30.7%
with full recompute) and the region's work was a fitted 26*tok*V/t.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig
from ltmdsl.kinds.base import (
    CacheTerm, CheckError, Flops, Kind, ModelContext, Param, Split, divide, no_context_limit, none_inactive,
    none_per_use,
)
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, per_replica

R = sympy.Rational


@dataclass(frozen=True)
class MlstmConfig(LayerConfig):
    """xLSTM-7B's mLSTM layer: H heads, total q/k width `qk_dim` and value width `v_dim`, gate soft-cap
    (None: uncapped), biases on the projections and norm with `bias`, the kernel's `eps`, the per-head
    LayerNorm's `norm_eps`, `chunk` tokens per chunk of the parallel form."""

    heads: int  # H
    qk_dim: int  # Qk = H * Dqk
    v_dim: int  # V = H * Dv
    soft_cap: float | None
    bias: bool
    chunk: int
    eps: float
    norm_eps: float
    kind: str = field(default="mlstm", init=False)

    @property
    def dqk(self) -> int:
        return self.qk_dim // self.heads

    @property
    def dv(self) -> int:
        return self.v_dim // self.heads


def build(v: dict[str, Any], ctx: ModelContext) -> MlstmConfig:
    heads = v["heads"]
    qk_dim = v["qk_dim"] if v["qk_dim"] is not None else divide(ctx.d_model, 2, "the default qk_dim d_model / 2",
                                                                "qk_dim")
    v_dim = v["v_dim"] if v["v_dim"] is not None else ctx.d_model
    for name, width in (("qk_dim", qk_dim), ("v_dim", v_dim)):
        if width % heads:
            given = v[name] is not None
            raise CheckError(f"{name} ({width}{'' if given else ', the default'}) must be a multiple of heads "
                             f"({heads}): each head takes {name} / heads channels", name if given else "heads")
    if v["soft_cap"] is not None and v["soft_cap"] <= 0:
        raise CheckError(f"soft_cap must be positive (or none for uncapped gates), got {v['soft_cap']}", "soft_cap")
    return MlstmConfig(heads=heads, qk_dim=qk_dim, v_dim=v_dim, soft_cap=v["soft_cap"], bias=v["bias"],
                       chunk=v["chunk"], eps=v["eps"], norm_eps=v["norm_eps"])


def count(c: MlstmConfig, d: int) -> int:
    Qk, V, H = c.qk_dim, c.v_dim, c.heads
    weights = 2 * d * Qk + 2 * d * V + 2 * (d * H + H) + V * d + V
    return weights + ((2 * Qk + 2 * V + V + d) if c.bias else 0)


def split(c: MlstmConfig, d: int) -> Split:
    """Heads split over tp (each head's memory is indivisible)."""
    return Split(tp=(("mLSTM heads", c.heads),), replicated=d if c.bias else 0)  # out_proj's bias


def cache(c: MlstmConfig, s) -> tuple[CacheTerm, ...]:
    b = per_replica(B, s.dp)
    sb = s.state_dtype.bytes
    h = R(c.heads, s.tp)
    return (CacheTerm("recurrent_state", "C", s.state_dtype, b * h * c.dqk * c.dv * sb),
            CacheTerm("recurrent_state", "n", s.state_dtype, b * h * c.dqk * sb),
            CacheTerm("recurrent_state", "m", s.state_dtype, b * h * sb))


def workspace(c: MlstmConfig, d: int, s):
    """The larger of the chunk's and the norm's moments (module docstring)."""
    b = per_replica(B, s.dp)
    cc = Smallest(C, T) / R(s.cp)
    tok, t = b * cc, R(s.tp)
    L = Smallest(c.chunk, cc)
    h = R(c.heads, s.tp)
    S = c.dqk * c.dv + c.dqk + 1
    held = s.activation_dtype.bytes * tok * (2 * c.qk_dim + 3 * c.v_dim + 2 * c.heads) / t + 8 * tok * h
    scan = 12 * b * h * S + 4 * b * L * (2 * c.qk_dim + 4 * c.v_dim) / t + 16 * b * h * L**2
    norm = (s.activation_dtype.bytes + 8) * tok * c.v_dim / t + 4 * b * h * S
    return held + Largest(scan, norm)


def stored(c: MlstmConfig, x, selective: bool):
    """Module docstring; the same under selective recompute."""
    out = x.base + x.split(x.a * x.tok * (2 * c.qk_dim + 3 * c.v_dim + 2 * c.heads))
    if x.c > 1:  # context parallel: the memories entering the pieces and chunks, the gathered ones (docstring)
        S = c.dqk * c.dv + c.dqk + 1  # fp32 values of C, n and m per head
        out += 4 * x.b * x.split(c.heads) * (S * (x.pieces + x.last_chunk) + (S + 1) * x.chunks)
    return out


def step_flops(c: MlstmConfig) -> int:
    """One recurrent step: decay and update C and n (3 each per element), read out both (2 each)."""
    return 5 * c.heads * c.dqk * c.dv + 5 * c.heads * c.dqk


def flops(c: MlstmConfig) -> dict[str, Flops]:
    H, Dk, Dv = c.heads, c.dqk, c.dv
    L = Smallest(c.chunk, T)
    per_tok = 2 * L * H * (Dk + Dv) + 4 * H * Dk * Dv + 4 * H * Dk
    return {"ssm": Flops(sympy.Integer(step_flops(c)), per_tok * T + 2 * H * (Dk * Dv + Dk) * sympy.ceiling(T / L))}


def dims(c: MlstmConfig) -> str:
    cap = "uncapped" if c.soft_cap is None else f"cap={c.soft_cap:g}"
    return f"H={c.heads} Dqk={c.dqk} Dv={c.dv} C={c.chunk} {cap}" + (" +bias" if c.bias else "")


def backward(c: MlstmConfig, x):
    """The backward's peak beyond `stored` and the output's gradient (module docstring): the fp32 gates and the
    chunk start states throughout, then the larger of the norm's moment and the chunk's."""
    h = x.split(c.heads)
    rows, piece = x.b * x.pieces, x.s / x.pieces  # under cp the rank's pieces are folded into the batch
    L = Smallest(c.chunk, piece)
    state = 4 * rows * h * (c.dqk * c.dv + c.dqk + 1)  # one fp32 (C, n, m)
    Q, Xk, Xv = 4 * rows * h * L**2, 4 * rows * h * L * c.dqk, 4 * rows * h * L * c.dv  # one chunk's fp32 tensors
    A, F, g = x.split(x.a * x.tok * c.v_dim), x.split(4 * x.tok * c.v_dim), x.split(4 * x.tok * c.heads)
    held = 6 * g + state * sympy.ceiling(piece / c.chunk)
    norm = 6 * F + 4 * A
    graph = 4 * Q + 4 * Xk + 5 * Xv + 2 * state + Largest(Q + 2 * Xv + Xk, 6 * Xv)
    chunk = 4 * A + x.split(x.a * x.tok * (2 * c.qk_dim + c.v_dim)) + 2 * g + state + graph
    return held + Largest(norm, chunk)


KIND = Kind(
    name="mlstm",
    doc="xLSTM-7B's mLSTM layer: matrix memory with exponential input and sigmoid forget gates.",
    config=MlstmConfig,
    params=(
        Param("heads", "int", required=True, min=1, doc="heads H"),
        Param("qk_dim", "int", nullable=True, min=1, doc="total query/key width (default d_model / 2)"),
        Param("v_dim", "int", nullable=True, min=1, doc="total value width (default d_model)"),
        Param("soft_cap", "float", 15.0, nullable=True, doc="gate soft-cap s: s tanh(x / s); none: uncapped"),
        Param("bias", "bool", False, doc="biases on q, k, v, the output gate, out_proj and the norm"),
        Param("chunk", "int", 64, min=1, doc="tokens per chunk of the parallel form"),
        Param("eps", "float", 1e-6, min=0, doc="eps of the mLSTM denominator"),
        Param("norm_eps", "float", 1e-6, min=0, doc="eps of the per-head LayerNorm"),
    ),
    is_ffn=False,
    build=build,
    count=count,
    inactive=none_inactive,
    split=split,
    context_check=no_context_limit,
    cache=cache,
    workspace=workspace,
    stored=stored,
    backward=backward,
    flops=flops,
    dims=dims,
    per_use=none_per_use,
)
