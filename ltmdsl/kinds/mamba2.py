"""Mamba-2 state-space duality layer (Dao & Gu 2024): its IR config and every pure facet.

Recurrent state per sub-layer on one GPU (b = ceil(B/dp), state dtype s_bytes, constant in T):
    conv  b * (Di/t + 2*ceil(G/t)*N) * taps * s_bytes      SSM  b * Hs/t * P * N * s_bytes
  (t > G: each tp rank holds the one group its heads read, replicated over the ranks sharing it)
  taps = K ("full") or K - 1 ("minus_one"), the budget's conv_taps convention.
Prefill workspace for a chunk of Cc = min(C, T) tokens (tok = b * Cc/c; Di', Hs' and conv_dim' = Di + 2GN
over t, whose 2GN/t is one group's 2N when t exceeds the groups), as the runtime holds it (traced by `ltmdsl memory --measure`): zxbcdt, the conv output and the scan
output a * tok * (2Di + 2GN + Hs + conv_dim + Di)/t and the fp32 dt 4 * tok * Hs' throughout (the scan
output from the end of the scan's first chunk), then the largest of three moments:
    scan   one SSD chunk of n tokens: four fp32 [b, n, n, Hs'] tensors (segment sums,
           masked, exponentiated, C.B scores) 16 * b * n^2 * Hs', B and C per head 8 * b * n * Hs' * N,
           dt * x 4 * b * n * Di', the cumulative log-decay 4 * b * n * Hs' and the boolean causal mask n^2:
           the first chunk (L = min(chunk, Cc/c)) without the scan output, which is allocated after it, and
           beside the cached state's fp32 copy when the state dtype is not fp32 (ssd_scan holds the state it
           started from until the last chunk); a later chunk (the longest, min(chunk, Cc/c - chunk) tokens,
           when there is one) beside the scan output, the fp32 state entering it 4 * b * Hs' * P * N and that
           copy. Until this convention one moment was counted, with the output and one state, and without
           the decay, the mask and the copy: 1.46 MiB under a six-sub-layer Zamba2 stack's traced moment at
           Cc = 1024 tokens (+0.9%), +1.66% on one 2.7B-wide layer; -4.0% at Cc = 256 with an fp32 state.
    gate   y + D x, y * silu(z), its normalised copy and the weighted output in fp32 16 * tok * Di' (12
           without the gated norm: y + D x, silu(z) and the product) and the final state 4 * b * Hs' * P * N
Training activations per micro-batch (the runtime's scan keeps its inputs and recomputes the scan, the
fp32 dt, the skip and the gated norm in backward, as `mamba_split_conv1d_scan_combined` keeps zxbcdt):
    replicated  the pre-norm and the norm output fed to in_proj (`MicroBatch.base`)
    split       zxbcdt a*sb*(2Di + 2GN + Hs) (z and dt are kept), the conv's zero-padded input
                a*b*conv_dim*(s + K - 1), the conv output before and after its SiLU 2a*sb*conv_dim,
                out_proj's input a*sb*Di. No SSD chunk state is kept: no O(T/C) term.
    Selective recompute drops nothing more: the runtime recomputes the scan's internals under every policy.
    Context parallel (c > 1, the runtime's cp_forward, the same two recompute regions): the rank's p pieces
    (p = 2 under the balanced split, 1 contiguous) each pad the conv's input with their own K - 1 halo,
    a*b*conv_dim*(p - 1)*(K - 1) more; the state entering each piece, 4*b*p*Hs'*P*N (fp32), is the second
    region's input; the ranks' exchange of states keeps the state entering each chunk before the rank's last
    one, 4*b*Hs'*P*N per chunk (the last rank's last chunk is c under the balanced split, c - 1 contiguous),
    and every chunk's gathered total decay, 4*b*n*Hs' (n = 2c or c chunks). Until this convention the form
    kept the scans' fp32 internals, +64% over a rank's activations at cp = 2, and nothing of it was counted.
FLOPs: a recurrent step costs 6*Hs*P*N + 2*conv_dim*K; prefill runs SSD in chunks of L = min(chunk, T):
per token 2L*G*N (C.B^T) + 2L*Hs*P (masked mixing) + 4*Hs*P*N (chunk states, read-out) + the conv.
Backward (the `backward` facet: what one sub-layer's backward holds at its peak beyond `stored` and its output's
gradient; read off the runtime code tensor by tensor: runtime/chunk_recompute.py's `_Recompute.backward` re-runs the
`recompute` region under autograd, whose `ssd_scan` is `_ChunkRecompute`, whose backward re-runs
runtime/ops_ssd.py's `_ssd_chunk` one chunk at a time, last chunk first). Notation: r = b*p rows (b under one
process; under cp the rank's p pieces are folded into the batch) of s/p tokens, L = min(C, s/p) tokens a chunk,
Hs' = Hs/t heads, Di' = Di/t, BC = the rank's B and C channels (2GN/t, or one group's 2N beyond G ranks),
F = 4*tok*Di' and A = a*tok*Di' (one fp32 and one a-byte [tok, Di'] tensor), one fp32 state St = 4*r*Hs'*P*N.
The re-run region's output (a*tok*Di') takes the place of out_proj's input, kept in `stored` and freed once
out_proj has back-propagated, so it is not counted. Throughout: the state entering each chunk, kept by the scan's
node, the first the re-run's zero state (under cp the carried state, counted in `stored`),
St*(ceil(s/(C*p)) - [c > 1]). Then the larger of two moments:
    norm   the skip and gated RMSNorm back-propagating (`Mamba2._gated`, ops_norm's `gated_rmsnorm`): x cast to
           fp32 (kept by the skip's product), y + D x, z cast to fp32 and silu(z) (kept by the gate's product
           and silu), their product h (kept by its square and its normalisation) and five fp32 gradients (two
           products', the square's, the mean's and its scale's): 10F (without the norm, y * silu(z) alone: x and
           z cast, y + D x, silu(z), the output gradient cast to fp32 and two gradients, 7F); out_proj's input
           gradient A; the fp32 dt (softplus's input and output) 8*tok*Hs'
    chunk  one SSD chunk re-run and differentiated (`_ChunkRecompute.backward`), after the norm has
           back-propagated: of the region, dt and softplus's input in fp32 8*tok*Hs', out_proj's input gradient,
           the scan output's, x's (the skip's part) and z's gradients in a 4A, the scan's input gradients
           allocated whole (`dseq`): x's A, dt's 4*tok*Hs', B's and C's a*tok*BC; of the chunk, five fp32
           [r, L, L, Hs'] tensors (C.B, the masked exp(segsum), the scores' gradient and the two products'
           gradients) 20*r*L^2*Hs', four fp32 [r, L, Hs', N] (B and C per head, kept by the contractions, and two
           of their gradients) 16*r*L*Hs'*N, four fp32 [r, L, Di'] (x cast, the chunk's y, y's gradient slice
           cast to fp32 and one gradient) and x's gradient slice in a, (16 + a)*r*L*Di'; B's and C's gradient
           slices a*r*L*BC, dt's two fp32 [r, L, Hs'] gradients, the causal mask and its negation 2L^2; four
           states (the chunk's end state, the final state's zero gradient and two state gradients) 4St
Under cp the main region (the scan from the carried state, with the gated norm) is the larger of the three
regions' backward: the zero-start scan's region re-runs the same chunk graph without out_proj's and the skip's
gradients, and the total decay's region holds one [r, Hs'] decay. Until this convention the facet was the norm's
moment alone, fitted on the traced backward of one sub-layer (chunk 32 and 64, N 16 and 64, d_model 128 and 256):
a cp rank whose pieces are one chunk (64 tokens, N 32), where the chunk's moment is the larger, traced its peak
50% over the per-GPU total (58% under full recompute). Not counted: at small heads the chunk's backward can peak
earlier, at its output contraction's, with the scores still held (a cp rank at P 8, N 32, chunk 32: one more
[r, L, L, Hs'] and two more [r, L, Di'] tensors, +3.6% over the per-GPU total).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig
from ltmdsl.kinds.base import (
    CacheTerm, CheckError, Flops, Kind, ModelContext, Param, Split, conv_taps, divide, no_context_limit,
    none_inactive, none_per_use,
)
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, cdiv, per_replica

R = sympy.Rational


@dataclass(frozen=True)
class Mamba2Config(LayerConfig):
    """Mamba-2 SSD layer (Dao & Gu 2024), as in state-spaces/mamba's Mamba2.

    in_proj: d -> 2*d_inner + 2*G*N + heads (z, x, B, C, dt); depthwise conv over x, B, C;
    heads = d_inner / P; gated RMSNorm over d_inner (grouped by `n_groups`); out_proj: d_inner -> d.
    """

    d_state: int  # N
    head_dim: int  # P
    heads: int
    n_groups: int
    expand: int
    d_inner: int
    d_conv: int
    chunk: int  # C
    conv_bias: bool
    proj_bias: bool
    kind: str = field(default="mamba2", init=False)
    gated_norm: bool = True  # RMSNorm(y * silu(z)); False: y * silu(z) alone (Falcon-H1's mamba_rms_norm false)
    dt_min: float = 0.0  # the parallel (chunked) form clamps dt below at this (mamba_ssm's dt_limit; Zamba2: 1e-3)

    @property
    def conv_dim(self) -> int:
        """Channels that pass through the causal conv: x, B and C."""
        return self.d_inner + 2 * self.n_groups * self.d_state


def build(v: dict[str, Any], ctx: ModelContext) -> Mamba2Config:
    if v["heads"] is not None:  # Nemotron-H style: heads * head_dim need not be a multiple of d_model
        heads, d_inner = v["heads"], v["heads"] * v["head_dim"]
    else:
        d_inner = v["expand"] * ctx.d_model
        heads = divide(d_inner, v["head_dim"], f"the inner width expand * d_model = {d_inner}", "head_dim")
    if heads % v["n_groups"]:
        raise CheckError(f"SSM heads ({heads} = d_inner / head_dim) must be a multiple of n_groups ({v['n_groups']})",
                         "n_groups")
    return Mamba2Config(
        d_state=v["d_state"], head_dim=v["head_dim"], heads=heads, n_groups=v["n_groups"], expand=v["expand"],
        d_inner=d_inner, d_conv=v["d_conv"], chunk=v["chunk"], conv_bias=v["conv_bias"], proj_bias=v["proj_bias"],
        gated_norm=v["gated_norm"], dt_min=float(v["dt_min"]),
    )


def count(c: Mamba2Config, d: int) -> int:
    proj_out = 2 * c.d_inner + 2 * c.n_groups * c.d_state + c.heads
    in_proj = d * proj_out + (proj_out if c.proj_bias else 0)
    conv = c.conv_dim * c.d_conv + (c.conv_dim if c.conv_bias else 0)
    out_proj = c.d_inner * d + (d if c.proj_bias else 0)
    return in_proj + conv + 3 * c.heads + (c.d_inner if c.gated_norm else 0) + out_proj


def split(c: Mamba2Config, d: int) -> Split:
    """Heads and groups split over tp (Megatron-LM's Mamba split); the row-parallel out_proj's bias is
    replicated. Beyond n_groups ranks each holds the one group its heads read (B and C projection rows and
    conv channels, with their biases), replicated over the ranks sharing it."""
    GN = c.n_groups * c.d_state
    group_params = 2 * GN * (d + (1 if c.proj_bias else 0) + c.d_conv + (1 if c.conv_bias else 0))
    return Split(tp=(("SSM heads", c.heads),), grouped=(("groups", c.n_groups, group_params),),
                 replicated=d if c.proj_bias else 0)


def cache(c: Mamba2Config, s) -> tuple[CacheTerm, ...]:
    b = per_replica(B, s.dp)
    sb = s.state_dtype.bytes
    channels = R(c.d_inner, s.tp) + 2 * cdiv(c.n_groups, s.tp) * c.d_state  # x; B and C: one group beyond G ranks
    return (CacheTerm("recurrent_state", "conv", s.state_dtype,
                      b * channels * conv_taps(c.d_conv, s.conv_taps) * sb),
            CacheTerm("recurrent_state", "ssm", s.state_dtype, b * R(c.heads, s.tp) * c.head_dim * c.d_state * sb))


def _bc_per_rank(c: Mamba2Config, t) -> sympy.Expr:
    """The B and C channels a tp rank holds: 2GN/t, or one group's 2N when t exceeds the groups (each rank
    holds the group its heads read)."""
    return 2 * c.d_state * (R(c.n_groups, int(t)) if int(t) <= c.n_groups else 1)


def workspace(c: Mamba2Config, d: int, s):
    """The largest of the SSD chunks' and the gate's moments (module docstring)."""
    b = per_replica(B, s.dp)
    cc = Smallest(C, T) / R(s.cp)
    tok, t = b * cc, R(s.tp)
    a = s.activation_dtype.bytes
    hs, di, N = c.heads / t, c.d_inner / t, c.d_state
    bc = _bc_per_rank(c, t)
    zxbcdt, conv = (2 * c.d_inner + c.heads) / t + bc, di + bc  # a rank's in_proj outputs and conv channels
    held = a * tok * (zxbcdt + conv) + 4 * tok * hs  # zxbcdt, the conv output, the fp32 dt
    out = a * tok * di  # the scan output, allocated once its first chunk is done
    state = 4 * b * hs * c.head_dim * N
    copy = state if s.state_dtype.name != ("fp64" if a == 8 else "fp32") else 0  # the cached state, in fp32

    def chunk(n):  # one SSD chunk of n tokens: its fp32 temporaries (module docstring)
        return 16 * b * n**2 * hs + 8 * b * n * hs * N + 4 * b * n * (di + hs) + n**2

    later = Smallest(c.chunk, Largest(0, cc - c.chunk))  # the longest chunk after the first (0: there is none)
    first = chunk(Smallest(c.chunk, cc)) + copy
    after = Smallest(1, later) * (out + chunk(later) + state + copy)
    gate = out + (16 if c.gated_norm else 12) * tok * di + state
    return held + Largest(first, after, gate)


def stored(c: Mamba2Config, x, selective: bool):
    """Module docstring; the same under selective recompute."""
    a, tok = x.a, x.tok
    bc = _bc_per_rank(c, x.t)
    zxbcdt, conv = x.split(2 * c.d_inner + c.heads) + bc, x.split(c.d_inner) + bc  # a rank's widths
    out = x.base + a * tok * (zxbcdt + 3 * conv + x.split(c.d_inner)) + a * x.b * conv * (c.d_conv - 1)
    if x.c > 1:  # context parallel: the pieces' halos, their entering states and the exchange's (module docstring)
        state = 4 * x.b * x.split(c.heads * c.head_dim * c.d_state)  # one fp32 [b, Hs', P, N] state
        out += a * x.b * conv * (x.pieces - 1) * (c.d_conv - 1)
        out += state * (x.pieces + x.last_chunk) + 4 * x.b * x.chunks * x.split(c.heads)
    return out


def step_flops(c: Mamba2Config) -> int:
    """One recurrent step: 6*Hs*P*N for the SSM and 2*conv_dim*K for the conv."""
    return 6 * c.heads * c.head_dim * c.d_state + 2 * c.conv_dim * c.d_conv


def flops(c: Mamba2Config) -> dict[str, Flops]:
    L = Smallest(c.chunk, T)
    per_tok = (2 * L * c.n_groups * c.d_state + 2 * L * c.heads * c.head_dim
               + 4 * c.heads * c.head_dim * c.d_state + 2 * c.conv_dim * c.d_conv)
    return {"ssm": Flops(sympy.Integer(step_flops(c)), per_tok * T)}


def dims(c: Mamba2Config) -> str:
    return f"N={c.d_state} P={c.head_dim} heads={c.heads} G={c.n_groups} K={c.d_conv} C={c.chunk}"


def backward(c: Mamba2Config, x):
    """The backward's peak beyond `stored` and the output's gradient (module docstring): the chunk start states,
    then the larger of the gated norm's moment and one SSD chunk's."""
    a, tok, di, N = x.a, x.tok, x.split(c.d_inner), c.d_state
    hs, bc = x.split(c.heads), _bc_per_rank(c, x.t)
    rows, piece = x.b * x.pieces, x.s / x.pieces  # under cp the rank's pieces are folded into the batch
    L = Smallest(c.chunk, piece)
    F, A = 4 * tok * di, a * tok * di  # one fp32 and one a-byte [tok, Di'] tensor
    state = 4 * rows * hs * c.head_dim * N  # one fp32 [r, Hs', P, N] state
    # the re-run's zero state and each later chunk's start (under cp the first is the carried state, in `stored`)
    starts = state * (sympy.ceiling(piece / c.chunk) - (1 if x.c > 1 else 0))
    norm = (10 if c.gated_norm else 7) * F + A + 8 * tok * hs
    region = 12 * tok * hs + 5 * A + a * tok * bc
    graph = (20 * rows * L**2 * hs + 16 * rows * L * hs * N + (16 + a) * rows * L * di + a * rows * L * bc
             + 8 * rows * L * hs + 2 * L**2 + 4 * state)
    return starts + Largest(norm, region + graph)


KIND = Kind(
    name="mamba2",
    doc="Mamba-2 state-space duality (SSD) layer.",
    config=Mamba2Config,
    params=(
        Param("d_state", "int", 128, min=1, doc="SSM state size N"),
        Param("head_dim", "int", 64, min=1, doc="SSM head dim P"),
        Param("heads", "int", nullable=True, min=1, doc="SSM heads (default: expand * d_model / head_dim)"),
        Param("n_groups", "int", 1, min=1, doc="groups sharing B and C"),
        Param("expand", "int", 2, min=1, doc="d_inner = expand * d_model, unless heads is given"),
        Param("d_conv", "int", 4, min=1, doc="causal conv taps K"),
        Param("chunk", "int", 256, min=1, doc="SSD chunk length C"),
        Param("conv_bias", "bool", True),
        Param("proj_bias", "bool", False),
        Param("gated_norm", "bool", True, doc="RMSNorm(y * silu(z)) before out_proj; false: y * silu(z) alone"),
        Param("dt_min", "float", 0.0, min=0, doc="lower clamp of dt in the chunked (prefill) form, not in the step"),
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
