"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, ICLR 2025), as Qwen3-Next has it: its IR config and every pure facet.

The layer (transformers' Qwen3NextGatedDeltaNet), with Hk key heads of dim Dk and Hv value heads of dim Dv:
    in_proj_qkvz: d -> 2*Hk*Dk + 2*Hv*Dv (q, k, v, the output gate z)   in_proj_ba: d -> 2*Hv (beta, decay)
    a depthwise causal conv of K taps (silu) over the conv_dim = 2*Hk*Dk + Hv*Dv channels of q, k, v
    g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b); o = gated delta rule (q, k L2-normalised)
    y = norm.weight * rmsnorm(o) * silu(z) over each value head's Dv; out_proj: Hv*Dv -> d
Parameters: d*(2*Hk*Dk + 2*Hv*Dv) + d*2*Hv + conv_dim*K (+ conv_dim with conv_bias) + 2*Hv + Dv + Hv*Dv*d.

Recurrent state per sub-layer on one GPU (b = ceil(B/dp), state dtype s_bytes, constant in T):
    conv   b * conv_dim/t * taps * s_bytes           delta  b * Hv/t * Dk * Dv * s_bytes
  taps = K ("full") or K - 1 ("minus_one"), the budget's conv_taps convention; tp splits whole key heads
  (and with them their Hv/Hk value heads), so tp must divide Hk.
Prefill workspace for a chunk of Cc = min(C, T) tokens (the chunked WY form, as flash-linear-attention's
chunk_gated_delta_rule allocates it; L = chunk):
    a * b * Cc/c * (qkvz + 2Hv + conv_dim + Hv*Dv)/t        projections, conv output, rule output
  + a * b * Cc/c * Hv/t * (Dk + 2Dv + L)                    W, U, the corrected values and the triangular inverse
  + 4 * b * Cc/c * Hv/t                                     the fp32 cumulative log-decay (KDA: * Dk)
  + a * b * Hv/t * Dk * Dv * ceil(Cc/L)                     the chunk states h (in the input dtype, as fla)
Training activations, per micro-batch (flash-linear-attention saves q, k, v, g, beta and the chunk's
triangular inverse A; chunk states are recomputed in backward, so no O(T/L) term):
    replicated  norm input and projection input 2a*sbh
    split       projections a*sb*(qkvz + 2Hv) and the rule output a*sb*Hv*Dv, always; the conv output
                a*sb*conv_dim, A a*sb*Hv*L, the gated-norm output a*sb*Hv*Dv and fp32 g, beta 8*sb*Hv
                (KDA: 4*sb*Hv*(Dk + 1)) unless selective recompute recomputes them.
FLOPs per value head: a recurrent step decays S (Dk*Dv), reads S^T k (2 Dk*Dv), writes k d^T (2 Dk*Dv) and
reads out S^T q (2 Dk*Dv): 7*Dk*Dv, plus 2*conv_dim*K for the conv. Prefill in chunks of L = min(chunk, T),
per token and value head: the k.k and q.k scores 4*L*Dk, the triangular solve for [U | W] L*(Dk + Dv), the
intra-chunk read-out 2*L*Dv, and the state products W S, (q*decay) S and the state update 6*Dk*Dv.
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
from ltmdsl.memory.symbols import B, C, T, per_replica

R = sympy.Rational


@dataclass(frozen=True)
class GatedDeltaNetConfig(LayerConfig):
    """Gated DeltaNet layer as transformers' Qwen3NextGatedDeltaNet computes it (module docstring).

    Each key head serves Hv / Hk consecutive value heads (grouped value attention); the output gate and
    gated RMSNorm over each value head are always present, as in Qwen3-Next.
    """

    key_heads: int  # Hk
    value_heads: int  # Hv
    head_dim: int  # Dk
    v_head_dim: int  # Dv
    d_conv: int  # K
    conv_bias: bool
    chunk: int  # L, the chunk of the WY form
    kind: str = field(default="gated_deltanet", init=False)

    @property
    def key_dim(self) -> int:
        """Hk * Dk, the width of q and of k."""
        return self.key_heads * self.head_dim

    @property
    def value_dim(self) -> int:
        """Hv * Dv, the width of v, z and the rule output."""
        return self.value_heads * self.v_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels that pass through the causal conv: q, k and v."""
        return 2 * self.key_dim + self.value_dim


def check_chunk(chunk: int) -> None:
    """The chunk of the WY form must be a power of two (the generated kernels tile by it)."""
    if chunk & (chunk - 1):
        raise CheckError(f"chunk must be a power of two, got {chunk}", "chunk")


def build(v: dict[str, Any], ctx: ModelContext) -> GatedDeltaNetConfig:
    key_heads = v["key_heads"]
    value_heads = v["value_heads"] if v["value_heads"] is not None else key_heads
    if value_heads % key_heads:
        raise CheckError(f"value_heads ({value_heads}) must be a multiple of key_heads ({key_heads}): each key head "
                         "serves the same number of value heads", "value_heads")
    check_chunk(v["chunk"])
    head_dim = v["head_dim"]
    return GatedDeltaNetConfig(
        key_heads=key_heads, value_heads=value_heads, head_dim=head_dim,
        v_head_dim=v["v_head_dim"] if v["v_head_dim"] is not None else head_dim, d_conv=v["d_conv"],
        conv_bias=v["conv_bias"], chunk=v["chunk"],
    )


def count(c: GatedDeltaNetConfig, d: int) -> int:
    in_proj = d * (2 * c.key_dim + 2 * c.value_dim) + d * 2 * c.value_heads  # in_proj_qkvz, in_proj_ba
    conv = c.conv_dim * c.d_conv + (c.conv_dim if c.conv_bias else 0)
    return in_proj + conv + 2 * c.value_heads + c.v_head_dim + c.value_dim * d  # dt_bias, A_log, norm, out_proj


def split(c: GatedDeltaNetConfig, d: int) -> Split:
    """Tensor parallelism splits whole key heads (each with its value heads); the output norm's weight,
    shared by every head, is replicated."""
    return Split(tp=(("key heads", c.key_heads),), replicated=c.v_head_dim)


# ---- memory and compute (shared with KDA, ltmdsl/kinds/kda.py) ------------------------------------


def delta_cache(conv_dim: int, d_conv: int, heads: int, dk: int, dv: int, s) -> tuple[CacheTerm, ...]:
    """Conv taps [b, conv_dim/t, taps] and the delta-rule state [b, Hv/t, Dk, Dv], in the state dtype."""
    b = per_replica(B, s.dp)
    sb = s.state_dtype.bytes
    conv = b * R(conv_dim, s.tp) * conv_taps(d_conv, s.conv_taps) * sb
    return (CacheTerm("recurrent_state", "conv", s.state_dtype, conv),
            CacheTerm("recurrent_state", "delta", s.state_dtype, b * R(heads, s.tp) * dk * dv * sb))


def delta_workspace(proj: int, conv_dim: int, heads: int, dk: int, dv: int, chunk: int, s, decay: int = 1):
    """Prefill workspace of one chunk (module docstring); `proj` is the width of the input projections and
    `decay` the log-decays per head and token (1 for a scalar decay, Dk for KDA's per-channel one)."""
    b = per_replica(B, s.dp)
    tok = b * sympy.Min(C, T) / R(s.cp)  # b * Cc / c
    t = R(s.tp)
    chunks = sympy.ceiling(sympy.Min(C, T) / chunk)
    a = s.activation_dtype.bytes
    return (a * tok * (proj + conv_dim + heads * dv) / t + a * tok * heads / t * (dk + 2 * dv + chunk)
            + 4 * tok * heads * decay / t + a * b * heads / t * dk * dv * chunks)


def delta_stored(proj: int, conv_dim: int, heads: int, dv: int, chunk: int, x, selective: bool, decay: int = 1):
    """Training activations per micro-batch (module docstring); `proj` is the width of the input projections,
    `decay` the log-decays per head and token (1 for a scalar decay, Dk for KDA's per-channel one)."""
    a, tok = x.a, x.tok
    out = x.base + x.split(a * tok * (proj + heads * dv))
    if not selective:
        out += x.split(a * tok * (conv_dim + heads * chunk + heads * dv) + 4 * tok * heads * (decay + 1))
    return out


def delta_flops(conv_dim: int, d_conv: int, heads: int, dk: int, dv: int, chunk: int) -> dict[str, Flops]:
    """The delta rule and the conv beyond the projections, in the "ssm" (recurrent mixer) component."""
    step = 7 * heads * dk * dv + 2 * conv_dim * d_conv
    L = sympy.Min(chunk, T)
    per_tok = heads * (4 * L * dk + L * (dk + dv) + 2 * L * dv + 6 * dk * dv) + 2 * conv_dim * d_conv
    return {"ssm": Flops(sympy.Integer(step), per_tok * T)}


def _proj(c: GatedDeltaNetConfig) -> int:
    return 2 * c.key_dim + 2 * c.value_dim + 2 * c.value_heads


def cache(c: GatedDeltaNetConfig, s) -> tuple[CacheTerm, ...]:
    return delta_cache(c.conv_dim, c.d_conv, c.value_heads, c.head_dim, c.v_head_dim, s)


def workspace(c: GatedDeltaNetConfig, d: int, s):
    return delta_workspace(_proj(c), c.conv_dim, c.value_heads, c.head_dim, c.v_head_dim, c.chunk, s)


def stored(c: GatedDeltaNetConfig, x, selective: bool):
    return delta_stored(_proj(c), c.conv_dim, c.value_heads, c.v_head_dim, c.chunk, x, selective)


def flops(c: GatedDeltaNetConfig) -> dict[str, Flops]:
    return delta_flops(c.conv_dim, c.d_conv, c.value_heads, c.head_dim, c.v_head_dim, c.chunk)


def dims(c: GatedDeltaNetConfig) -> str:
    return (f"Hk={c.key_heads} Hv={c.value_heads} Dk={c.head_dim} Dv={c.v_head_dim} K={c.d_conv} "
            f"C={c.chunk}")


KIND = Kind(
    name="gated_deltanet",
    doc="Gated DeltaNet (Qwen3-Next): the delta rule with a per-head scalar decay, output-gated RMSNorm.",
    config=GatedDeltaNetConfig,
    params=(
        Param("key_heads", "int", required=True, min=1, doc="query/key heads Hk"),
        Param("value_heads", "int", nullable=True, min=1,
              doc="value heads Hv, a multiple of key_heads (default: key_heads)"),
        Param("head_dim", "int", 128, min=1, doc="query/key head dim Dk"),
        Param("v_head_dim", "int", nullable=True, min=1, doc="value head dim Dv (default: head_dim)"),
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
    flops=flops,
    dims=dims,
    per_use=none_per_use,
)
