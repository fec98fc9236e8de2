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
gradient; r = b*p rows, b under one process, the rank's p pieces folded into the batch under cp, of s/p tokens,
L = min(chunk, s/p), n = ceil(s/(p*chunk)) chunks a row, l = ceil(log2 L) doubling steps of the scan; A = a*tok*W'
one [tok, W'] tensor in the activation dtype, St = 4*r*W' one fp32 state, X = 4*r*L*W' one chunk's fp32 tensor).
The `recompute` region's backward (runtime/chunk_recompute.py `_Recompute`) re-runs `_core` under autograd and
back-propagates it; its peak is in the scan node's chunk loop (`_ChunkRecompute.backward`), holding
    region  the scan's three zeroed input gradients (x and the two gates) 3A; the gates' sigmoid outputs and,
            over more than one gate block on the rank (H/t > 1), their flattened copies (the block einsum leaves
            them head-major) 4A, else 2A; over more than one row (r > 1) the two gate einsums' contiguous copies of
            x (the conv output is channel-major) 2A; the region's re-run output, linear_out's input gradient, h's
            gradient and y's (the GeLU's backward runs before the scan's) 4A; less linear_out's input, counted
            in `stored` and freed once linear_out back-propagated, A
    states  the chunk start states n*St ((n - 1)*St under cp, where the first is the region's input, counted in
            `stored`), the final state's zero gradient and the start-state gradients of this chunk and the one
            after it 3St
    chunk   the chunk re-run and back-propagating (runtime/ops_rglru.py `_rglru_chunk`): the coefficients' graph
            (-c*r_t, log a_t's exp, expm1 and sqrt, the reset-masked a_t and scale, i_t's and x's fp32 copies,
            scale*i_t and b_t) 10X; the decays and inputs of the doubling steps but the last, already
            back-propagated, 2(l - 1)X; the chunk's output h_t and its output gradient in fp32 2X; the gradients
            at their widest (h_t's with the end state's, the last decays', one step's two zero-padded slices and
            their sum) 5X; and, after the first chunk back-propagated (n > 1), that chunk's three input gradients
            in the activation dtype 3*a*r*L*W' (the loop's `got` iterator holds them until the next chunk's
            replace them).
The cp form's zero-start-scan and total-decay regions hold no more while they back-propagate (their scans'
input gradients in place of the re-run output's and h's). Read per tensor off the trace's peak at width 128, 4
blocks, chunk 16 (one process, b = 1; cp 2, b = 2). Traced at width 96 (2 blocks, chunk 32, context 256) and
width 64 (4 blocks, chunk 8, context 128, b = 2), under every recompute policy: the prediction is 1.1% to 3.7%
over the traced peak on one process, cp 2 and tp 2 x cp 2 x sp, by the same bytes for both shapes (b*s*d
scaled: the final norm's kept tensors, freed before the stack back-propagates, less the stream's gradient; a
convention shared by every kind), and the activations exact. Until this convention the term was counted on the
traced backward, 20*tok*W' + 100*r*L*W' (traced -1.5% to +2.6%, its coefficients absorbing that shared slack).
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
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, per_replica

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
    cc = Smallest(C, T) / R(s.cp)
    tok, w = b * cc, c.width / R(s.tp)
    a = s.activation_dtype.bytes
    return 5 * a * tok * w + 4 * b * w + Largest(24 * b * Smallest(c.chunk, cc) * w, 2 * a * tok * w)


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
    """The backward's peak beyond `stored` and the output's gradient (module docstring): the region's tensors
    over the sequence, the chunk start states and one chunk's scan re-run and back-propagating."""
    w = x.split(c.width)
    rows, piece = x.b * x.pieces, x.s / x.pieces  # under cp the rank's pieces are folded into the batch
    L = Smallest(c.chunk, piece)
    n = sympy.ceiling(piece / c.chunk)  # chunks of a row
    A = x.a * x.tok * w  # one [tok, W'] tensor in the activation dtype
    St, X = 4 * rows * w, 4 * rows * L * w  # one fp32 state [rows, W'], one chunk's fp32 [rows, L, W']
    gates = (4 if c.heads > x.t else 2) * A  # sigmoid's outputs, and their flattened copies over > 1 block
    copies = 2 * A * Smallest(1, rows - 1)  # the gate einsums' contiguous copies of x over > 1 row
    region = 3 * A + gates + copies + 4 * A - A  # (docstring) less linear_out's input, freed by then
    # the scan's doubling steps but the first, l - 1: one for each offset 2, 4, ... below L (ceil(L/2^k) > 1)
    later_steps = sympy.Add(*(Smallest(1, sympy.ceiling(L / 2**k) - 1) for k in range(1, (c.chunk - 1).bit_length())))
    states = (n - (1 if x.c > 1 else 0) + 3) * St  # under cp the first start state is the region's input
    graph = (10 + 2 * later_steps + 2 + 5) * X + 3 * x.a * rows * L * w * Smallest(1, n - 1)
    return region + states + graph


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
