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
gradient; L = min(64, s), Di' = Di/t): the `recompute` region runs again over the whole sequence under autograd,
keeping softplus's fp32 input and output, x and z in fp32, silu(z) and y + D x (five fp32 [tok, Di'] tensors)
beside the scan's output in a and the fp32 gradients of dt, B and C: (20 + a)*tok*Di' + 4*tok*(R + 2N); the
scan's autograd node keeps each chunk's fp32 start state, 4*b*Di'*N*ceil(s/64); and one chunk's log-depth scan is
re-run and differentiated: the decays and inputs each of its log2(64) = 6 levels keeps and their gradients,
4*b*Di'*N*L*(3*6 + 1). Under cp the rank's p pieces are rows of the batch: the last two terms count b*p rows
of chunks of L = min(64, s/p) (b rows of L = min(64, s) had the cp form's backward 92% above its
temporaries). Counted on the traced backward of one sub-layer at d_model 128 and 256, T 256 and 512: within 1.5%.
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
from ltmdsl.memory.symbols import B, C, Largest, T, per_replica

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
    cc = sympy.Min(C, T) / R(s.cp)
    tok, di, N = b * cc, c.d_inner / R(s.tp), c.d_state
    L = sympy.Min(SCAN_CHUNK, cc)
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


def backward(c: MambaConfig, x):
    """The backward's peak beyond `stored` and the output's gradient (module docstring)."""
    a, tok, N, di = x.a, x.tok, c.d_state, x.split(c.d_inner)
    rows, piece = x.b * x.pieces, x.s / x.pieces  # under cp the rank's pieces are folded into the batch
    L = sympy.Min(SCAN_CHUNK, piece)
    levels = math.ceil(math.log2(SCAN_CHUNK))  # the log-depth scan's levels (L < 64 has fewer: counted as 64's)
    region = (20 + a) * tok * di + 4 * tok * (c.dt_rank + 2 * N)
    scan = 4 * rows * di * N * L * (3 * levels + 1)
    starts = 4 * rows * di * N * sympy.ceiling(piece / SCAN_CHUNK)
    return region + scan + starts


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
