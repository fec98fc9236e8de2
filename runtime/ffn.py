"""Feed-forward sub-layers: the dense MLP and the sparse mixture of experts.

Activations (`act`): swiglu = silu(gate) * up, geglu = gelu(gate) * up (exact erf GELU), gelu = gelu(up),
relu2 = relu(up)^2 (Primer), relu = relu(up). MLP: down(act(gate(x), up(x))) with Llama's names.

MoE routing over E experts, top-k per token (ir.MoEConfig):
    softmax_topk_renorm (Mixtral): p = softmax(router(x)); keep top-k; divide by their sum
    softmax_topk        (Jamba):   p = softmax(router(x)); keep top-k as they are
    topk_softmax:                  softmax over the top-k logits (equals Mixtral's)
Expert weights are stacked: gate_proj/up_proj [E, F, d], down_proj [E, d, F] (transformers' layout).
Every token's k experts are computed exactly (no capacity limit, no dropped tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ltmdsl.kinds.mlp import MLPConfig
from ltmdsl.kinds.moe import MoEConfig
from ltmdsl.runtime import initializers as init

GATED = ("swiglu", "geglu")
ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu2", "relu")


def activate(name: str, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
    """The hidden activation of an FFN: gate, up [..., F] (gate None when not gated) -> [..., F]."""
    if name == "swiglu":
        return F.silu(gate) * up
    if name == "geglu":
        return F.gelu(gate) * up
    if name == "gelu":
        return F.gelu(up)
    if name == "relu2":
        return torch.relu(up).square()
    if name == "relu":
        return torch.relu(up)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


class MLP(nn.Module):
    """Dense FFN: x [..., d] -> [..., d]. gate_proj only for gated activations."""

    def __init__(self, cfg: MLPConfig, d: int):
        super().__init__()
        self.cfg = cfg
        self.gate_proj = nn.Linear(d, cfg.d_ff, bias=cfg.bias) if cfg.gated else None
        self.up_proj = nn.Linear(d, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, d, bias=cfg.bias)

    def init_weights(self, gen: torch.Generator) -> None:
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            if lin is not None:
                init.linear_(lin, gen)

    def forward(self, x: torch.Tensor, state=None, pos0: int = 0) -> torch.Tensor:
        gate = self.gate_proj(x) if self.gate_proj is not None else None  # [..., F]
        return self.down_proj(activate(self.cfg.activation, gate, self.up_proj(x)))

    def step(self, x: torch.Tensor, state=None, pos0: int = 0) -> torch.Tensor:
        return self.forward(x)


class Experts(nn.Module):
    """Stacked expert weights: gate_proj [E,F,d] (gated only), up_proj [E,F,d], down_proj [E,d,F]."""

    def __init__(self, E: int, F_: int, d: int, gated: bool):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(E, F_, d)) if gated else None
        self.up_proj = nn.Parameter(torch.empty(E, F_, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, F_))

    def init_weights(self, gen: torch.Generator) -> None:
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            if p is not None:
                init.normal_(p, gen)


def route(logits: torch.Tensor, top_k: int, routing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [M, E] -> (weights [M, k] in the logits' work dtype, expert indices [M, k])."""
    work = logits.double() if logits.dtype == torch.float64 else logits.float()
    if routing == "topk_softmax":
        top, idx = torch.topk(work, top_k, dim=-1)
        return torch.softmax(top, dim=-1), idx
    probs = torch.softmax(work, dim=-1)  # [M, E]
    w, idx = torch.topk(probs, top_k, dim=-1)  # [M, k]
    if routing == "softmax_topk_renorm":
        w = w / w.sum(-1, keepdim=True)
    elif routing != "softmax_topk":
        raise ValueError(f"unknown MoE routing {routing!r}")
    return w, idx


class MoE(nn.Module):
    """Top-k mixture of experts: x [..., d] -> [..., d]; names router.weight [E,d] and experts.*."""

    def __init__(self, cfg: MoEConfig, d: int):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(d, cfg.experts, bias=False)
        self.experts = Experts(cfg.experts, cfg.d_ff, d, cfg.activation in GATED)

    def init_weights(self, gen: torch.Generator) -> None:
        init.linear_(self.router, gen)
        self.experts.init_weights(gen)

    def forward(self, x: torch.Tensor, state=None, pos0: int = 0) -> torch.Tensor:
        cfg = self.cfg
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # [M, d]
        w, idx = route(self.router(xf), cfg.top_k, cfg.routing)  # [M, k], [M, k]
        out = torch.zeros_like(xf)  # [M, d]
        ex = self.experts
        for e in range(cfg.experts):
            tok, slot = torch.where(idx == e)  # tokens routed to expert e, and which of their k slots
            if tok.numel() == 0:
                continue
            xe = xf[tok]  # [m, d]
            gate = xe @ ex.gate_proj[e].t() if ex.gate_proj is not None else None  # [m, F]
            he = activate(cfg.activation, gate, xe @ ex.up_proj[e].t()) @ ex.down_proj[e].t()  # [m, d]
            out.index_add_(0, tok, (he * w[tok, slot, None].to(he.dtype)).to(out.dtype))
        return out.view(shape)

    def step(self, x: torch.Tensor, state=None, pos0: int = 0) -> torch.Tensor:
        return self.forward(x)
