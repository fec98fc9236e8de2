"""Dense feed-forward network (gated SwiGLU/GeGLU, GeGLU with tanh GELU, or plain GELU/ReLU^2/ReLU): its IR config and pure facets.

It keeps nothing between decode steps (no cache), and its FLOPs are all projections (2 per parameter per
token, counted by the compute model for every kind), so `cache` and `flops` are explicitly empty.
Prefill workspace for a chunk of Cc = min(C, T) tokens: a * b * Cc/c * 2F/t, a * b * Cc/c * F/t for relu and
  relu2 (`inference_ffn_width`: without autograd the runtime computes act(gate) and the product in place, so
  act(gate) and up, or up and gelu(up), are all that is live at once).
Training activations (Korthikanti et al. 2022), per micro-batch:
    replicated  norm input and MLP input 2a*sbh, dropout mask sbh (dropout only)
    split       gated: gate, up, product 3a*sb*F; otherwise up, activation 2a*sb*F (Settings.saved_by = "fused");
                eager autograd also keeps act(gate): 4a*sb*F gated, a*sb*F for relu (`saved_ffn_width`)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig
from ltmdsl.kinds.base import (
    ACTIVATIONS, GATED, Flops, Kind, ModelContext, Param, Split, inference_ffn_width, no_cache, no_context_limit,
    none_inactive, saved_ffn_width, none_per_use,
)
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, per_replica

R = sympy.Rational


@dataclass(frozen=True)
class MLPConfig(LayerConfig):
    """Dense feed-forward network. swiglu/geglu/geglu_tanh: gate, up, down; gelu/relu2/relu: up, down."""

    d_ff: int
    activation: str  # "swiglu" | "geglu" | "geglu_tanh" | "gelu" | "relu2" | "relu"
    bias: bool
    kind: str = field(default="mlp", init=False)

    @property
    def gated(self) -> bool:
        return self.activation in GATED


def build(v: dict[str, Any], ctx: ModelContext) -> MLPConfig:
    return MLPConfig(d_ff=v["d_ff"], activation=v["act"], bias=v["bias"])


def count(c: MLPConfig, d: int) -> int:
    if c.gated:
        return 3 * d * c.d_ff + ((2 * c.d_ff + d) if c.bias else 0)
    return 2 * d * c.d_ff + ((c.d_ff + d) if c.bias else 0)


def split(c: MLPConfig, d: int) -> Split:
    """d_ff splits over tp (the runtime's plan refuses a tp that does not divide it); the row-parallel
    down_proj's bias is replicated."""
    return Split(replicated=d if c.bias else 0)


def workspace(c: MLPConfig, d: int, s):
    tok = per_replica(B, s.dp) * Smallest(C, T) / R(s.cp)  # b * Cc / c
    return s.activation_dtype.bytes * tok * inference_ffn_width(c.activation, c.d_ff) / R(s.tp)


def stored(c: MLPConfig, x, selective: bool):
    out = x.base + x.split(x.a * x.tok * saved_ffn_width(c.activation, c.d_ff, x.eager))
    return out + (x.rep(x.tok * x.h) if x.dropout else 0)


def flops(c: MLPConfig) -> dict[str, Flops]:
    """Nothing beyond its projections."""
    return {}


def dims(c: MLPConfig) -> str:
    return f"d_ff={c.d_ff} {c.activation}"


def backward(c: MLPConfig, x):
    """The backward's peak beyond `stored` and the output's gradient: the gradients of the hidden activations,
    a*tok*2F gated (of the gate and the up projection) or a*tok*F, or down_proj's weight gradient in w
    beside the gradient of its input, a*tok*F + w*d*F (the larger)."""
    F, a, tok = c.d_ff, x.a, x.tok
    hidden = x.split(a * tok * (2 * F if c.gated else F))
    weight = x.split(a * tok * F + x.w * x.h * F)
    return Largest(hidden, weight)


KIND = Kind(
    name="mlp",
    doc="Dense feed-forward network.",
    config=MLPConfig,
    params=(
        Param("d_ff", "int", required=True, min=1, doc="hidden width"),
        Param("act", "enum", "swiglu", choices=ACTIVATIONS),
        Param("bias", "bool", False),
    ),
    is_ffn=True,
    build=build,
    count=count,
    inactive=none_inactive,
    split=split,
    context_check=no_context_limit,
    cache=no_cache,
    workspace=workspace,
    stored=stored,
    backward=backward,
    flops=flops,
    dims=dims,
    per_use=none_per_use,
)
