"""LFM2's gated short convolution (Liquid AI 2025, LFM2; transformers' Lfm2ShortConv): IR config and pure facets.

The layer (d = d_model, L = `kernel` taps):
    B, C, x = in_proj(u).chunk(3)            in_proj: d -> 3d
    y = C * conv_L(B * x)                     depthwise causal conv of L taps over the d channels
    out = out_proj(y)                         out_proj: d -> d
`bias` puts a bias on in_proj, the conv and out_proj together (transformers' `conv_bias`).

Parameters: 3d^2 + L d + d^2, plus 3d + d + d with bias.
Recurrent state per sub-layer on one GPU (b = ceil(B/dp), state dtype s_bytes, constant in T):
    conv  b * d/t * taps * s_bytes,  taps = L ("full", as transformers keeps them) or L - 1 ("minus_one")
There is no other state: the layer's memory of the past is its last L - 1 gated inputs.
Prefill workspace for a chunk of Cc = min(C, T) tokens: a * b * Cc/c * 6d/t (BCx, B*x, conv output, y).
Training activations per micro-batch:
    replicated  norm input and in_proj input 2a*sbh
    split       BCx 3a*sbd, B*x and the conv output a*sbd each, and y (out_proj input) a*sbd; selective
                recompute keeps them all, as the runtime does (it recomputes the attention core only,
                Megatron-LM's definition). (Until 2026-12 the model dropped B*x and the conv output under
                selective, which the runtime never did: a short conv traced +20% over its prediction there.)
FLOPs beyond the projections (the compute model's recurrent-mixer component "ssm"): 2 L d (the conv) + 2d
(the two gates) per token, prefill T times that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig
from ltmdsl.kinds.base import (
    CacheTerm, Flops, Kind, ModelContext, Param, Split, conv_taps, no_context_limit, none_inactive, none_per_use,
)
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, per_replica

R = sympy.Rational


@dataclass(frozen=True)
class ShortConvConfig(LayerConfig):
    """Gated short convolution over the model width: in_proj d -> 3d (B, C, x), y = C * conv_L(B * x),
    out_proj d -> d. `width` is d_model (the conv's channels), resolved so every back end reads it here."""

    width: int  # d
    kernel: int  # L
    bias: bool
    kind: str = field(default="short_conv", init=False)


def build(v: dict[str, Any], ctx: ModelContext) -> ShortConvConfig:
    return ShortConvConfig(width=ctx.d_model, kernel=v["kernel"], bias=v["bias"])


def count(c: ShortConvConfig, d: int) -> int:
    w, L = c.width, c.kernel
    biases = (3 * w + w + d) if c.bias else 0
    return d * 3 * w + w * L + w * d + biases


def split(c: ShortConvConfig, d: int) -> Split:
    """Channels split over tp (in_proj's B, C and x, the conv); the row-parallel out_proj's bias is
    replicated."""
    return Split(tp=(("channels", c.width),), replicated=d if c.bias else 0)


def cache(c: ShortConvConfig, s) -> tuple[CacheTerm, ...]:
    b = per_replica(B, s.dp)
    return (CacheTerm("recurrent_state", "conv", s.state_dtype,
                      b * R(c.width, s.tp) * conv_taps(c.kernel, s.conv_taps) * s.state_dtype.bytes),)


def workspace(c: ShortConvConfig, d: int, s):
    tok = per_replica(B, s.dp) * Smallest(C, T) / R(s.cp)  # b * Cc / c
    return s.activation_dtype.bytes * tok * 6 * c.width / R(s.tp)


def stored(c: ShortConvConfig, x, selective: bool):
    """The same under every policy but full recompute: nothing of a short conv is the attention core."""
    return x.base + x.split(x.a * x.tok * 6 * c.width)


def step_flops(c: ShortConvConfig) -> int:
    """One token beyond the projections: the L-tap conv and the two gates."""
    return 2 * c.kernel * c.width + 2 * c.width


def flops(c: ShortConvConfig) -> dict[str, Flops]:
    step = step_flops(c)
    return {"ssm": Flops(sympy.Integer(step), step * T)}


def dims(c: ShortConvConfig) -> str:
    return f"L={c.kernel} width={c.width}" + (" +bias" if c.bias else "")


def backward(c: ShortConvConfig, x):
    """The backward's peak beyond `stored` and the output's gradient: two gradients of the gated
    convolution's width, 2a*tok*W, or out_proj's weight gradient in w beside its input's, a*tok*W + w*W*d."""
    a, tok = x.a, x.tok
    return Largest(x.split(2 * a * tok * c.width), x.split(a * tok * c.width + x.w * c.width * x.h))


KIND = Kind(
    name="short_conv",
    doc="LFM2's gated short convolution: y = C * conv(B * x).",
    config=ShortConvConfig,
    params=(
        Param("kernel", "int", 3, min=1, doc="conv taps L (LFM2's conv_L_cache)"),
        Param("bias", "bool", False, doc="biases on in_proj, the conv and out_proj (LFM2's conv_bias)"),
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
