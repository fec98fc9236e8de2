"""Sparse mixture of experts with a linear top-k router: its IR config and every pure facet.

Parameters: the router d*E and E experts (no biases); a token touches the router and k experts, so the
other E - k experts are `inactive`. Expert parallelism shards the experts (ep must divide E).
It keeps nothing between decode steps (no cache), and its FLOPs are projections only.
Prefill workspace for a chunk of Cc = min(C, T) tokens:
    a * b * Cc/c * k * (2d + F*(3|2)/t) + 4 * b * Cc/c * E   (dispatch + expert MLPs + fp32 router)
Training activations (dropless top-k, perfectly balanced routing so expert parallelism moves tokens but
not bytes), per micro-batch:
    replicated  norm input and router input 2a*sbh; router logits and probabilities fp32 8*sb*E;
                k dispatched copies of the input and k expert outputs 2k*a*sbh
    split       each of the k expert MLPs as a dense MLP: k * (3|2) * a*sb*F
    saved_by = "eager" (ltmdsl's runtime under autograd): the expert MLPs keep act(gate) too (4F gated), and
                the scatter-add of the router-weighted expert outputs keeps its source, k*a*sbh more
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig
from ltmdsl.kinds.base import (
    ACTIVATIONS, GATED, CheckError, Flops, Kind, ModelContext, Param, Split, ffn_width, no_cache, no_context_limit,
    saved_ffn_width,
)
from ltmdsl.memory.symbols import B, C, T, per_replica

R = sympy.Rational
ROUTINGS = ("softmax_topk_renorm", "softmax_topk", "topk_softmax")


@dataclass(frozen=True)
class MoEConfig(LayerConfig):
    """Sparse mixture of experts: a linear router over E experts, top-k per token.

    routing "softmax_topk_renorm" (Mixtral): softmax over all experts, keep top-k, renormalise to sum 1.
    routing "softmax_topk" (Jamba): softmax over all experts, keep top-k, no renormalisation.
    routing "topk_softmax": keep top-k logits, softmax over those (equivalent to Mixtral's, kept for clarity).
    """

    experts: int  # E
    top_k: int  # k
    d_ff: int
    activation: str
    routing: str
    kind: str = field(default="moe", init=False)

    def expert_params(self, d_model: int) -> int:
        """Parameters of one expert (no biases): gate, up and down for gated activations."""
        return (3 if self.activation in GATED else 2) * d_model * self.d_ff

    def inactive_params(self, d_model: int) -> int:
        """Parameters a token does not touch: the experts it is not routed to."""
        return (self.experts - self.top_k) * self.expert_params(d_model)


def build(v: dict[str, Any], ctx: ModelContext) -> MoEConfig:
    if v["top_k"] > v["experts"]:
        raise CheckError(f"top_k ({v['top_k']}) exceeds experts ({v['experts']})", "top_k")
    return MoEConfig(experts=v["experts"], top_k=v["top_k"], d_ff=v["d_ff"], activation=v["act"], routing=v["routing"])


def count(c: MoEConfig, d: int) -> int:
    return d * c.experts + c.experts * c.expert_params(d)


def inactive(c: MoEConfig, d: int) -> int:
    return c.inactive_params(d)


def split(c: MoEConfig, d: int) -> Split:
    """Expert parallelism shards the experts (ep must divide E); the router is dense."""
    return Split(ep=(("experts", c.experts),), expert_params=c.experts * c.expert_params(d))


def workspace(c: MoEConfig, d: int, s):
    tok = per_replica(B, s.dp) * sympy.Min(C, T) / R(s.cp)  # b * Cc / c
    a = s.activation_dtype.bytes
    return a * tok * c.top_k * (2 * d + ffn_width(c.activation, c.d_ff) / R(s.tp)) + 4 * tok * c.experts


def stored(c: MoEConfig, x, selective: bool):
    a, tok = x.a, x.tok
    copies = 3 if x.eager else 2  # dispatched inputs, expert outputs (and eager: the weighted outputs)
    return (x.base + x.rep(8 * tok * c.experts + copies * c.top_k * a * tok * x.h)
            + x.split(c.top_k * a * tok * saved_ffn_width(c.activation, c.d_ff, x.eager)))


def flops(c: MoEConfig) -> dict[str, Flops]:
    """Nothing beyond its projections (the router and the k routed experts, counted as active parameters)."""
    return {}


def dims(c: MoEConfig) -> str:
    return f"E={c.experts} k={c.top_k} d_ff={c.d_ff} {c.activation} {c.routing}"


KIND = Kind(
    name="moe",
    doc="Sparse mixture of experts with a linear top-k router.",
    config=MoEConfig,
    params=(
        Param("experts", "int", required=True, min=1, doc="E"),
        Param("top_k", "int", 2, min=1, doc="experts per token k"),
        Param("d_ff", "int", required=True, min=1, doc="hidden width of each expert"),
        Param("act", "enum", "swiglu", choices=ACTIVATIONS),
        Param("routing", "enum", "softmax_topk_renorm", choices=ROUTINGS,
              doc="softmax_topk_renorm (Mixtral), softmax_topk (Jamba), topk_softmax"),
    ),
    is_ffn=True,
    build=build,
    count=count,
    inactive=inactive,
    split=split,
    context_check=no_context_limit,
    cache=no_cache,
    workspace=workspace,
    stored=stored,
    flops=flops,
    dims=dims,
)
