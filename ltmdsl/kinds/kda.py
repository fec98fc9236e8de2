"""Kimi Delta Attention (Kimi Team, "Kimi Linear", 2025), as transformers' KimiDeltaAttention: IR config and facets.

The layer, with H heads of dim Dh (keys and values alike):
    q_proj, k_proj, v_proj: d -> H*Dh each; a depthwise causal conv of K taps (silu) over the 3*H*Dh channels
    forget gate  g = -exp(A_log) * softplus(f_b_proj(f_a_proj(u)) + dt_bias)   [H, Dh] per token: one decay
                 per key channel (f_a_proj: d -> Dh, f_b_proj: Dh -> H*Dh, dt_bias [H*Dh], A_log [H])
    beta = sigmoid(b_proj(u)) [H];  o = gated delta rule with per-channel decay (q, k L2-normalised)
    y = o_norm.weight * rmsnorm(o) * sigmoid(g_b_proj(g_a_proj(u))) over each head's Dh;  o_proj: H*Dh -> d
The low-rank gate projections have rank Dh, as transformers builds them.
Parameters: 3*d*H*Dh + 3*H*Dh*K (+ 3*H*Dh with conv_bias) + d*Dh + Dh*H*Dh + H*Dh + H (forget gate)
            + d*H (b_proj) + d*Dh + Dh*H*Dh (output gate) + Dh (o_norm) + H*Dh*d (o_proj).

Memory and compute follow Gated DeltaNet's formulas (ltmdsl/kinds/gated_deltanet.py, which states them) with
Hk = Hv = H, Dk = Dv = Dh, conv_dim = 3*H*Dh, decay = Dh log-decays per head and token, and nothing kept beside
the conv: recurrent state b * (conv_dim/t * taps + H/t * Dh * Dh) * s_bytes, constant in T; tp splits whole
heads. The prefill workspace adds the forget gate's moment, a*n*conv_dim + 4*n*H + 12*n*H*Dh (q, k, v,
beta, and in fp32 the gate's input, its softplus and g), and its finish keeps o, the output gate and the
norm output. Training adds the gates' rank-Dh intermediates (f_a_proj's and g_a_proj's outputs, 2a*sb*Dh,
whole on every tensor-parallel rank) to the shared terms. The per-channel decay's element-wise scaling
inside the chunked form is not counted in the FLOPs (the matmuls are).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig
from ltmdsl.kinds.base import Flops, Kind, ModelContext, Param, Split, no_context_limit, none_inactive, none_per_use
from ltmdsl.kinds.gated_deltanet import (
    DeltaShape, check_chunk, delta_backward, delta_cache, delta_flops, delta_stored, delta_workspace, norm_gate_block,
)
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, per_replica

R = sympy.Rational


@dataclass(frozen=True)
class KDAConfig(LayerConfig):
    """Kimi Delta Attention as transformers' KimiDeltaAttention computes it (module docstring)."""

    heads: int  # H
    head_dim: int  # Dh, keys and values
    d_conv: int  # K
    conv_bias: bool
    chunk: int  # L, the chunk of the WY form
    kind: str = field(default="kda", init=False)

    @property
    def inner(self) -> int:
        """H * Dh, the width of q, k, v, the decay and the output gate."""
        return self.heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels that pass through the causal conv: q, k and v."""
        return 3 * self.inner


def build(v: dict[str, Any], ctx: ModelContext) -> KDAConfig:
    check_chunk(v["chunk"])
    return KDAConfig(heads=v["heads"], head_dim=v["head_dim"], d_conv=v["d_conv"], conv_bias=v["conv_bias"],
                     chunk=v["chunk"])


def count(c: KDAConfig, d: int) -> int:
    qkv = 3 * d * c.inner
    conv = c.conv_dim * c.d_conv + (c.conv_dim if c.conv_bias else 0)
    forget = d * c.head_dim + c.head_dim * c.inner + c.inner + c.heads  # f_a, f_b, dt_bias, A_log
    gate = d * c.head_dim + c.head_dim * c.inner  # g_a, g_b
    return qkv + conv + forget + d * c.heads + gate + c.head_dim + c.inner * d  # b_proj, o_norm, o_proj


def split(c: KDAConfig, d: int) -> Split:
    """Tensor parallelism splits whole heads; the low-rank down-projections of the forget and output gates
    (f_a_proj, g_a_proj) and the output norm's weight, shared by every head, are replicated."""
    return Split(tp=(("heads", c.heads),), replicated=2 * d * c.head_dim + c.head_dim)


def shape(c: KDAConfig) -> DeltaShape:
    """The shared widths: Hk = Hv = H, Dk = Dv = Dh, per-channel decay, nothing beside the conv."""
    return DeltaShape(c.conv_dim, c.d_conv, c.heads, c.head_dim, c.head_dim, c.chunk, True, 0)


def cache(c: KDAConfig, s):
    return delta_cache(c.conv_dim, c.d_conv, c.heads, c.head_dim, c.head_dim, s)


def workspace(c: KDAConfig, d: int, s):
    sh, t, inner = shape(c), R(s.tp), c.inner

    def finish(n, a, b, cw):
        """o, the output gate and the gated norm's output, with one norm block's temporaries or o_proj's output."""
        return a * n * 3 * inner / t + Largest(norm_gate_block(sh, b, cw, t), a * n * d)

    b = per_replica(B, s.dp)
    n = b * Smallest(C, T) / R(s.cp)
    a = s.activation_dtype.bytes
    # the forget gate: q, k, v after the conv, beta, and in fp32 the gate's input, its softplus and g
    gate = (a * n * c.conv_dim + 4 * n * c.heads + 12 * n * inner) / t
    return delta_workspace(sh, s, finish, (gate,))


def stored(c: KDAConfig, x, selective: bool):
    """The shared terms plus the gates' rank-Dh intermediates (f_a_proj's and g_a_proj's outputs, which every
    tensor-parallel rank computes whole)."""
    return delta_stored(shape(c), x) + x.a * x.tok * 2 * c.head_dim


def flops(c: KDAConfig) -> dict[str, Flops]:
    return delta_flops(c.conv_dim, c.d_conv, c.heads, c.head_dim, c.head_dim, c.chunk)


def dims(c: KDAConfig) -> str:
    return f"H={c.heads} Dh={c.head_dim} K={c.d_conv} C={c.chunk} per-channel decay"


def backward(c: KDAConfig, x):
    """The shared terms plus the gradient of the layer's input from the gates' low-rank projections, a*tok*d."""
    return delta_backward(shape(c), x) + x.a * x.tok * x.h


KIND = Kind(
    name="kda",
    doc="Kimi Delta Attention (Kimi-Linear): the delta rule with a per-channel decay, sigmoid-gated RMSNorm.",
    config=KDAConfig,
    params=(
        Param("heads", "int", required=True, min=1, doc="heads H (keys and values alike)"),
        Param("head_dim", "int", 128, min=1, doc="head dim Dh, also the rank of the gate projections"),
        Param("d_conv", "int", 4, min=1, doc="causal conv taps K over q, k, v"),
        Param("conv_bias", "bool", False),
        Param("chunk", "int", 64, min=1, doc="chunk length of the WY form; a power of two"),
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
