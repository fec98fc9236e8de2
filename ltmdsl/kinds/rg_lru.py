"""RecurrentGemma's recurrent block with the RG-LRU (De et al. 2024, "Griffin: Mixing Gated Linear Recurrences
with Local Attention for Efficient Language Models"; transformers' RecurrentGemmaRecurrentBlock): its IR
config and every pure facet.

The block (d = d_model, W = `width` = lru_width, H = `heads` gate blocks of W/H, K = `d_conv`):
    y = act(linear_y(u))                        linear_y: d -> W (+bias); act GeLU (tanh form)
    x = conv_K(linear_x(u))                     linear_x: d -> W (+bias); depthwise causal conv (+bias)
    i = sigmoid(x W_i + b_i), r = sigmoid(x W_a + b_a)     block-diagonal gates, H blocks of W/H
    a = exp(-8 r softplus(a_param)), h_t = a h_{t-1} + sqrt(1 - a^2) (i x)   (h_t = i x at position 0)
    out = linear_out(h * y)                     linear_out: W -> d (+bias)

Parameters: 2(dW + W) + (Wd + d) + (WK + W) + W + 2(W^2/H + W).
Recurrent state per sub-layer on one GPU (b = ceil(B/dp), state dtype s_bytes, constant in T):
    conv  b * W/t * taps * s_bytes (taps = K "full" or K - 1 "minus_one", as RecurrentGemma keeps them)
    rg_lru  b * W/t * s_bytes
Prefill workspace for a chunk of Cc = min(C, T) tokens (tok = b * Cc/c, W' = W/t), as the runtime holds it
(traced by `ltmdsl memory --measure`): linear_y's output, the conv output, the two gates and the scan's output
h a * tok * 5W' and the fp32 state 4 * b * W', then the larger of two moments:
    scan   one chunk of L = min(chunk, Cc/c) tokens of the log-depth scan: six fp32 [b, L, W'] tensors
           24 * b * L * W'
    out    act(y) and h * act(y): 2a * tok * W'
Training activations per micro-batch (the runtime's scan keeps its inputs and recomputes the activation, the
gates and the recurrence in backward):
    replicated  the pre-norm and the norm output fed to the projections (`MicroBatch.base`); the reset flags,
                one byte per position s
    split       linear_y's output, the conv output and linear_out's input 3a*sbW, the conv's zero-padded
                input a*b*W*(s + K - 1)
    Selective recompute drops nothing more: the runtime recomputes the block's internals under every policy.
    Context parallel (c > 1, the runtime's cp_forward, the same recompute regions as one process): the reset
    flags of the rank's folded rows, b*s bytes rather than s; the rank's p pieces (p = 2 under the balanced
    split, 1 contiguous) each pad the conv's input with their own K - 1 halo, a*b*W*(p - 1)*(K - 1) more; the
    state entering each piece, 4*b*p*W' (fp32), is the last region's input; the ranks' exchange of states
    (h <- h * decay_j + h_j over the chunks) keeps the state entering each chunk before the rank's last one
    (the last rank's last chunk is c under the balanced split, c - 1 contiguous) and every chunk's gathered
    total decay prod a_t, one fp32 [b, W'] each, 4*b*W'*n (n = 2c or c chunks). Until this convention the
    form kept the fp32 gates and the scans' chunk states, +37% over a rank's activations at cp = 2, uncounted.
FLOPs beyond the parameters' 2 per token: a step costs 2WK (the conv) + 8W (decay, input scale, update
and output gate); prefill counts the same work for each of the T tokens.
Backward (the `backward` facet: what one sub-layer's backward holds at its peak beyond `stored` and its output's
gradient, W' = W/t): the `recompute` region runs again over the whole sequence: the fp32 gates, their log-decay
and the gated input (five fp32 [tok, W'] tensors, 20*tok*W'); and one chunk of L = min(chunk, s) tokens of the
scan re-run and differentiated, 25 fp32 [L, W'] tensors (100*b*L*W'; under cp the rank's p pieces are rows of
the batch, b*p rows of L = min(chunk, s/p): b rows of min(chunk, s) put the cp form's peak 17% above it).
Counted on the traced backward at chunk 16 and 32, d_model 128 and 256: within 3%.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig
from ltmdsl.kinds.base import (
    CacheTerm, CheckError, Flops, Kind, ModelContext, Param, Split, conv_taps, no_context_limit, none_inactive,
    none_per_use,
)
from ltmdsl.memory.symbols import B, C, Largest, T, per_replica

R = sympy.Rational
ACTIVATIONS = ("gelu_tanh", "gelu")


@dataclass(frozen=True)
class RgLruConfig(LayerConfig):
    """Griffin / RecurrentGemma recurrent block: width W, H gate blocks, conv of K taps, act on the y branch,
    `chunk` tokens per step of the parallel scan."""

    width: int  # W (lru_width)
    heads: int  # H, blocks of the block-diagonal gates
    d_conv: int  # K
    act: str
    chunk: int
    kind: str = field(default="rg_lru", init=False)


def build(v: dict[str, Any], ctx: ModelContext) -> RgLruConfig:
    width = v["width"] if v["width"] is not None else ctx.d_model
    if width % v["heads"]:
        raise CheckError(f"the RG-LRU width ({width}) must be a multiple of heads ({v['heads']}), the blocks of "
                         f"its block-diagonal gates", "heads")
    return RgLruConfig(width=width, heads=v["heads"], d_conv=v["d_conv"], act=v["act"], chunk=v["chunk"])


def count(c: RgLruConfig, d: int) -> int:
    W = c.width
    return 2 * (d * W + W) + (W * d + d) + (W * c.d_conv + W) + W + 2 * (W * W // c.heads + W)


def split(c: RgLruConfig, d: int) -> Split:
    """Gate blocks split over tp (a block-diagonal gate cannot be cut inside a block)."""
    return Split(tp=(("RG-LRU gate blocks", c.heads),), replicated=d)  # the row-parallel linear_out's bias


def cache(c: RgLruConfig, s) -> tuple[CacheTerm, ...]:
    b = per_replica(B, s.dp)
    sb = s.state_dtype.bytes
    w = R(c.width, s.tp)
    return (CacheTerm("recurrent_state", "conv", s.state_dtype, b * w * conv_taps(c.d_conv, s.conv_taps) * sb),
            CacheTerm("recurrent_state", "lru", s.state_dtype, b * w * sb))


def workspace(c: RgLruConfig, d: int, s):
    """The larger of the scan chunk's and the output's moments (module docstring)."""
    b = per_replica(B, s.dp)
    cc = sympy.Min(C, T) / R(s.cp)
    tok, w = b * cc, c.width / R(s.tp)
    a = s.activation_dtype.bytes
    return 5 * a * tok * w + 4 * b * w + Largest(24 * b * sympy.Min(c.chunk, cc) * w, 2 * a * tok * w)


def stored(c: RgLruConfig, x, selective: bool):
    """Module docstring; the same under selective recompute."""
    out = x.base + x.s + x.split(3 * x.a * x.tok * c.width + x.a * x.b * c.width * (x.s + c.d_conv - 1))
    if x.c > 1:  # context parallel: the rows' resets, the pieces' halos and states, the exchange's (docstring)
        out += (x.b - 1) * x.s + x.split(x.a * x.b * c.width * (x.pieces - 1) * (c.d_conv - 1))
        out += 4 * x.b * x.split(c.width) * (x.pieces + x.last_chunk + x.chunks)
    return out


def step_flops(c: RgLruConfig) -> int:
    """One token: the K-tap conv and the elementwise recurrence."""
    return 2 * c.width * c.d_conv + 8 * c.width


def flops(c: RgLruConfig) -> dict[str, Flops]:
    step = step_flops(c)
    return {"ssm": Flops(sympy.Integer(step), step * T)}


def dims(c: RgLruConfig) -> str:
    return f"W={c.width} H={c.heads} K={c.d_conv} {c.act}"


def backward(c: RgLruConfig, x):
    """The backward's peak beyond `stored` and the output's gradient (module docstring)."""
    w = x.split(c.width)
    rows, piece = x.b * x.pieces, x.s / x.pieces  # under cp the rank's pieces are folded into the batch
    return 20 * x.tok * w + 100 * rows * sympy.Min(c.chunk, piece) * w


KIND = Kind(
    name="rg_lru",
    doc="RecurrentGemma's recurrent block: conv, RG-LRU with block-diagonal gates, GeLU-gated output.",
    config=RgLruConfig,
    params=(
        Param("heads", "int", required=True, min=1, doc="blocks of the block-diagonal gates (must divide width)"),
        Param("width", "int", nullable=True, min=1, doc="RG-LRU width (default d_model; lru_width)"),
        Param("d_conv", "int", 4, min=1, doc="temporal conv taps K (conv1d_width)"),
        Param("act", "enum", "gelu_tanh", choices=ACTIVATIONS, doc="activation of the y branch"),
        Param("chunk", "int", 64, min=1, doc="tokens per chunk of the parallel scan"),
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
