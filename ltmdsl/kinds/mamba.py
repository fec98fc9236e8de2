"""Mamba-1 selective state-space layer (Gu & Dao 2023): its IR config and every pure facet.

Recurrent state per sub-layer on one GPU (b = ceil(B/dp), state dtype s_bytes, constant in T):
    conv  b * Di/t * taps * s_bytes      SSM  b * Di/t * N * s_bytes
  taps = K ("full") or K - 1 ("minus_one"), the budget's conv_taps convention.
Prefill workspace for a chunk of Cc = min(C, T) tokens (tok = b * Cc/c, Di' = Di/t), as the runtime holds it
(traced by `ltmdsl memory --measure`): xz, the conv output, the x_proj output and the scan output
a * tok * (4 Di' + R + 2N) throughout, then the larger of two moments:
    scan   the fp32 delta 4 * tok * Di' and one chunk of L = min(64, Cc/c) tokens of the log-depth scan:
           four fp32 [b, L, Di', N] tensors (decays, inputs, their next level and its update, one token
           short) 4 * b * Di' * N * (4L - 1), A 4 * Di' * N, the state's fp32 copy and a chunk's end state
           8 * b * Di' * N
    gate   (y + D x) * silu(z) in fp32: three fp32 tensors 12 * tok * Di' and the final state 4 * b * Di' * N
Training activations per micro-batch (the runtime's scan keeps its inputs and recomputes the scan, the fp32
delta, the skip and the gate in backward, as state-spaces/mamba's `mamba_inner_fn` does):
    replicated  the pre-norm and the norm output fed to in_proj (`MicroBatch.base`)
    split       xz 2a*sb*Di (z is kept), the conv's zero-padded input a*b*Di*(s + K - 1), the conv output
                before and after its SiLU 2a*sb*Di, out_proj's input a*sb*Di;
                x_proj's output a*sb*(R + 2N), or with Jamba's inner dt/B/C RMSNorms what each keeps
                (eager: (f + 2a)*sb*(R + 2N) + 12*sb, f = max(4, a); fused: 2a*sb*(R + 2N))
    Selective recompute drops nothing more: the runtime recomputes the scan's internals under every policy.
    Context parallel (c > 1, the runtime's cp_forward, the same recompute regions as one process): the rank's
    p pieces (p = 2 under the balanced split, 1 contiguous) each pad the conv's input with their own K - 1
    halo, a*b*Di*(p - 1)*(K - 1) more; the state entering each piece, 4*b*p*Di'*N (fp32), is the last
    region's input; the ranks' exchange of states (S <- S * decay_j + h_j over the chunks) keeps the state
    entering each chunk before the rank's last one, 4*b*Di'*N per chunk (the last rank's last chunk is c under
    the balanced split, c - 1 contiguous), and every chunk's gathered total decay exp(A * sum delta), one fp32
    [b, Di', N] each, 4*b*n*Di'*N (n = 2c or c chunks). Until this convention the form kept the fp32 delta,
    the scans' chunk states and the gate's fp32 work, +85% over a rank's activations at cp = 2, uncounted.
FLOPs: a recurrent step costs 6*Di*N (discretise, update, read out) + 2*Di*K (the conv); prefill scans
token by token, T steps.
Backward (the `backward` facet: what one sub-layer's backward holds at its peak beyond `stored` and its output's
gradient; read off the runtime code tensor by tensor: runtime/chunk_recompute.py's `_Recompute.backward` re-runs the
`recompute` region under autograd, whose `selective_scan` is `_ChunkRecompute`, whose backward re-runs
runtime/ops_scan.py's `_scan_chunk` one chunk at a time, last chunk first). Notation: r = b*p rows (b under one
process; under cp the rank's p pieces are folded into the batch) of s/p tokens, L = min(64, s/p) tokens a chunk,
l = ceil(log2 L) levels of the chunk's log-depth scan, Di' = Di/t, F = 4*tok*Di' (one fp32 [tok, Di'] tensor),
A = a*tok*Di'. The re-run region's output (a*tok*Di') takes the place of out_proj's input, kept in `stored` and
freed once out_proj has back-propagated, so it is not counted. Throughout: the state entering each chunk, kept by
the scan's node, the first the re-run's zero state (under cp the carried state, counted in `stored`),
4*r*Di'*N*(ceil(s/(64p)) - [c > 1]). Then the larger of two moments:
    gate   the skip and gate back-propagating ((y + D x) * silu(z) in fp32, `Mamba._gate`): x and z cast to fp32,
           y + D x and silu(z), each kept by the products; delta's fp32 linear output (softplus's input) and
           delta (softplus's output), kept for the scan and softplus; the gate's output gradient cast to fp32
           and the products' two gradients: 9F; out_proj's input gradient A: (36 + a)*tok*Di'
    chunk  one chunk re-run and differentiated (`_ChunkRecompute.backward`), after the gate has back-propagated:
           of the region, delta and softplus's input 2F, out_proj's input gradient, the scan output's, x's (the
           skip's part) and z's gradients in a 4A, the scan's input gradients allocated whole (`dseq`): x's A,
           delta's F, B's and C's 2a*tok*N; of the chunk, fp32 [r, L, Di', N] tensors: exp(delta A) and
           delta B u, then each level's decay products and partial sums, l and l of them with those two, kept
           by the next level's products (the last level's decay products, kept by h_t's, freed once that has
           back-propagated; its partial sums are kept by none), the chunk's states h_t (held by the end state's
           view) and five gradients over the chunk (h_t's from y and from the end state, their sum, one
           level's two operand gradients): 4*r*L*Di'*N*(2l + 6); u cast to fp32, delta*u, the chunk's y, y's
           gradient slice cast to fp32 and one gradient, five fp32 [r, L, Di'], and u's gradient slice in a,
           (20 + a)*r*L*Di'; C and B's fp32 casts and gradient slices (4 + 2a)*r*L*N; four fp32 [r, Di', N]
           states (the chunk's end state, the final state's zero gradient, the start state's gradient and a
           broadcast sum) and A, its exp and its gradient, 12*Di'*N
Under cp the main region (the scan from the carried state, with the gate) is the larger of the three regions'
backward: the zero-start scan's region re-runs the same chunk graph without out_proj's and the skip's gradients,
and the total decay's region holds one [r, Di', N] state. Until this convention the facet was the sum of the
two moments, fitted on the traced backward of one sub-layer (d_model 128 and 256, T 256 and 512), with 19
chunk tensors whatever the chunk's length: a cp rank with 32-token pieces traced 13% under it, and a small
state over a long sequence (N 1, T 2048, where the gate's moment is the larger) 17.7% over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig
from ltmdsl.kinds.base import (
    CacheTerm, Flops, Kind, ModelContext, Param, Split, conv_taps, no_context_limit, none_inactive, none_per_use,
)
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, per_replica

R = sympy.Rational
SCAN_CHUNK = 64  # tokens per chunk of the runtime's selective_scan (ltmdsl/runtime/ops_scan.py)


@dataclass(frozen=True)
class MambaConfig(LayerConfig):
    """Mamba-1 selective SSM (Gu & Dao 2023), as in state-spaces/mamba and Jamba.

    in_proj: d -> 2*d_inner; depthwise causal conv of `d_conv` taps; x_proj: d_inner -> dt_rank + 2N;
    dt_proj: dt_rank -> d_inner; A: (d_inner, N); out_proj: d_inner -> d. `inner_norms` adds Jamba's
    RMSNorms on dt, B and C.
    """

    d_state: int  # N
    d_conv: int
    expand: int
    d_inner: int
    dt_rank: int
    conv_bias: bool
    proj_bias: bool  # bias on in_proj and out_proj
    inner_norms: bool
    kind: str = field(default="mamba", init=False)


def build(v: dict[str, Any], ctx: ModelContext) -> MambaConfig:
    d_inner = v["expand"] * ctx.d_model
    dt_rank = v["dt_rank"] if v["dt_rank"] is not None else -(-ctx.d_model // 16)
    return MambaConfig(
        d_state=v["d_state"], d_conv=v["d_conv"], expand=v["expand"], d_inner=d_inner, dt_rank=dt_rank,
        conv_bias=v["conv_bias"], proj_bias=v["proj_bias"], inner_norms=v["inner_norms"],
    )


def count(c: MambaConfig, d: int) -> int:
    di, n, r = c.d_inner, c.d_state, c.dt_rank
    in_proj = d * 2 * di + (2 * di if c.proj_bias else 0)
    conv = di * c.d_conv + (di if c.conv_bias else 0)
    x_proj = di * (r + 2 * n)
    dt_proj = r * di + di
    out_proj = di * d + (d if c.proj_bias else 0)
    norms = (r + 2 * n) if c.inner_norms else 0
    return in_proj + conv + x_proj + dt_proj + di * n + di + out_proj + norms


def split(c: MambaConfig, d: int) -> Split:
    """Inner channels split over tp (in_proj, conv, x_proj's input, dt_proj, A, D); the inner norms of dt, B
    and C (after x_proj's all-reduce) and the row-parallel out_proj's bias are replicated."""
    return Split(tp=(("inner channels", c.d_inner),),
                 replicated=((c.dt_rank + 2 * c.d_state) if c.inner_norms else 0) + (d if c.proj_bias else 0))


def cache(c: MambaConfig, s) -> tuple[CacheTerm, ...]:
    b = per_replica(B, s.dp)
    sb = s.state_dtype.bytes
    di = R(c.d_inner, s.tp)
    return (CacheTerm("recurrent_state", "conv", s.state_dtype, b * di * conv_taps(c.d_conv, s.conv_taps) * sb),
            CacheTerm("recurrent_state", "ssm", s.state_dtype, b * di * c.d_state * sb))


def workspace(c: MambaConfig, d: int, s):
    """The larger of the scan's and the gate's moments (module docstring)."""
    b = per_replica(B, s.dp)
    cc = Smallest(C, T) / R(s.cp)
    tok, di, N = b * cc, c.d_inner / R(s.tp), c.d_state
    L = Smallest(SCAN_CHUNK, cc)
    held = s.activation_dtype.bytes * tok * (4 * di + c.dt_rank + 2 * N)
    scan = 4 * tok * di + 4 * b * di * N * (4 * L - 1) + 4 * di * N + 8 * b * di * N
    gate = 12 * tok * di + 4 * b * di * N
    return held + Largest(scan, gate)


def stored(c: MambaConfig, x, selective: bool):
    """Module docstring; the same under selective recompute."""
    a, tok, N = x.a, x.tok, c.d_state
    if not c.inner_norms:
        xdbl = a * tok * (c.dt_rank + 2 * N)
    elif x.eager:
        xdbl = (max(4, a) + 2 * a) * tok * (c.dt_rank + 2 * N) + 12 * tok
    else:
        xdbl = 2 * a * tok * (c.dt_rank + 2 * N)
    out = x.base + xdbl + x.split(6 * a * tok * c.d_inner + a * x.b * c.d_inner * (c.d_conv - 1))
    if x.c > 1:  # context parallel: the pieces' halos, their entering states and the exchange's (module docstring)
        state = 4 * x.b * x.split(c.d_inner * N)  # one fp32 [b, Di', N] state (or total decay)
        out += x.split(a * x.b * c.d_inner * (x.pieces - 1) * (c.d_conv - 1))
        out += state * (x.pieces + x.last_chunk + x.chunks)
    return out


def step_flops(c: MambaConfig) -> int:
    """One recurrent step: 6*Di*N for the SSM and 2*Di*K for the conv."""
    return 6 * c.d_inner * c.d_state + 2 * c.d_inner * c.d_conv


def flops(c: MambaConfig) -> dict[str, Flops]:
    step = step_flops(c)
    return {"ssm": Flops(sympy.Integer(step), step * T)}


def dims(c: MambaConfig) -> str:
    return f"N={c.d_state} K={c.d_conv} d_inner={c.d_inner} dt_rank={c.dt_rank}" + (" +norms" if c.inner_norms else "")


def _scan_levels(L):
    """ceil(log2 L) for 1 <= L <= 64: the steps of the log-depth scan over a chunk of L tokens (ops_scan's
    `_scan_chunk` doubles its offset from 1 while it is below L), as a sum of exact steps [L > 2^k]."""
    return sympy.Add(*(Smallest(1, sympy.ceiling(Largest(0, L - 2**k))) for k in range(int(math.log2(SCAN_CHUNK)))))


def backward(c: MambaConfig, x):
    """The backward's peak beyond `stored` and the output's gradient (module docstring): the chunk start states,
    then the larger of the gate's moment and one chunk's."""
    a, tok, N, di = x.a, x.tok, c.d_state, x.split(c.d_inner)
    rows, piece = x.b * x.pieces, x.s / x.pieces  # under cp the rank's pieces are folded into the batch
    L = Smallest(SCAN_CHUNK, piece)
    F, A = 4 * tok * di, a * tok * di  # one fp32 and one a-byte [tok, Di'] tensor
    # the re-run's zero state and each later chunk's start (under cp the first is the carried state, in `stored`)
    starts = 4 * rows * di * N * (sympy.ceiling(piece / SCAN_CHUNK) - (1 if x.c > 1 else 0))
    gate = 9 * F + A
    region = 3 * F + 5 * A + 2 * a * tok * N
    graph = 4 * rows * L * di * N * (2 * _scan_levels(L) + 6)
    chunk = region + graph + (20 + a) * rows * L * di + (4 + 2 * a) * rows * L * N + 16 * rows * di * N + 12 * di * N
    return starts + Largest(gate, chunk)


KIND = Kind(
    name="mamba",
    doc="Mamba-1 selective state-space layer (as in Mamba and Jamba).",
    config=MambaConfig,
    params=(
        Param("d_state", "int", 16, min=1, doc="SSM state size N"),
        Param("d_conv", "int", 4, min=1, doc="causal conv taps K"),
        Param("expand", "int", 2, min=1, doc="d_inner = expand * d_model"),
        Param("dt_rank", "int", nullable=True, min=1, doc="rank of the dt projection (default: ceil(d_model / 16))"),
        Param("conv_bias", "bool", True),
        Param("proj_bias", "bool", False),
        Param("inner_norms", "bool", False, doc="Jamba's RMSNorms on dt, B and C"),
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
