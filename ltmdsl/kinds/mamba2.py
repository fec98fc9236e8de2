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
gradient): the `recompute` region runs again over the whole sequence under autograd: the fp32 dt, y + D x, the
gated RMSNorm's fp32 input, gate, silu(gate) and normalised product, and their gradients, ten fp32 [tok, Di']
tensors beside one in a, (40 + a)*tok*Di', and the fp32 B and C per group and dt per head 4*tok*(2GN + Hs)/t;
the scan's autograd node keeps each chunk's fp32 start state, 4*b*Di'*N*ceil(s/C). One chunk's SSD graph
([L, L, Hs] scores) stays below these. Counted on the traced backward of one sub-layer (chunk 32 and 64, N 16
and 64, d_model 128 and 256): within 2%.
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
from ltmdsl.memory.symbols import B, C, Largest, T, cdiv, per_replica

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
    cc = sympy.Min(C, T) / R(s.cp)
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

    later = sympy.Min(c.chunk, Largest(0, cc - c.chunk))  # the longest chunk after the first (0: there is none)
    first = chunk(sympy.Min(c.chunk, cc)) + copy
    after = sympy.Min(1, later) * (out + chunk(later) + state + copy)
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
    L = sympy.Min(c.chunk, T)
    per_tok = (2 * L * c.n_groups * c.d_state + 2 * L * c.heads * c.head_dim
               + 4 * c.heads * c.head_dim * c.d_state + 2 * c.conv_dim * c.d_conv)
    return {"ssm": Flops(sympy.Integer(step_flops(c)), per_tok * T)}


def dims(c: Mamba2Config) -> str:
    return f"N={c.d_state} P={c.head_dim} heads={c.heads} G={c.n_groups} K={c.d_conv} C={c.chunk}"


def backward(c: Mamba2Config, x):
    """The backward's peak beyond `stored` and the output's gradient (module docstring)."""
    a, tok, di, N = x.a, x.tok, x.split(c.d_inner), c.d_state
    region = (40 + a) * tok * di + 4 * tok * (_bc_per_rank(c, x.t) + x.split(c.heads))
    starts = 4 * x.b * di * N * sympy.ceiling(x.s / c.chunk)
    return region + starts


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
