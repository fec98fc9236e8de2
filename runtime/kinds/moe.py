"""Sparse mixture-of-experts feed-forward sub-layer: a router and E stacked experts, top-k per token.

MoE routing over E experts, top-k per token (ir.MoEConfig):
    softmax_topk_renorm (Mixtral): p = softmax(router(x)); keep top-k; divide by their sum
    softmax_topk        (Jamba):   p = softmax(router(x)); keep top-k as they are
    topk_softmax:                  softmax over the top-k logits (equals Mixtral's)
Expert weights are stacked: gate_proj/up_proj [E, F, d], down_proj [E, d, F] (transformers' layout); the
activations are the MLP's (runtime/kinds/mlp.py). Every token's k experts are computed exactly (no
capacity limit, no dropped tokens).

The runtime entry `KIND` (runtime/kinds/__init__.py): the module, no cache, no kernel ops and its
parameter names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ltmdsl.kinds.moe import MoEConfig
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime.kinds import RuntimeKind
from ltmdsl.runtime.kinds.mlp import GATED, activate

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels


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
        self.expert_parallel = None  # set by ltmdsl.distributed.expert_parallel: forward runs ep_forward

    def init_weights(self, gen: torch.Generator) -> None:
        init.linear_(self.router, gen)
        self.experts.init_weights(gen)

    def forward(self, x: torch.Tensor, state=None, pos0: int = 0) -> torch.Tensor:
        if self.expert_parallel is not None:
            return ep_forward(self, x, self.expert_parallel)
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


def build(cfg: MoEConfig, d: int, eps: float, kernels: "Kernels") -> MoE:
    """The uniform constructor of the registry (a MoE needs neither a norm eps nor kernels)."""
    return MoE(cfg, d)


def state_names(cfg: MoEConfig) -> tuple[str, ...]:
    """The parameters a `MoE` owns: the router and the stacked experts (gate_proj only when gated)."""
    experts = (["gate_proj"] if cfg.activation in GATED else []) + ["up_proj", "down_proj"]
    return ("router.weight", *(f"experts.{p}" for p in experts))


def ep_forward(module: MoE, x: torch.Tensor, ep) -> torch.Tensor:
    """Expert parallelism (ltmdsl.distributed.expert_parallel.ExpertShard `ep`): x [..., d] -> [..., d].
    Each (token, slot) goes to the rank holding its expert, sorted by expert; that rank runs its E/ep
    experts and returns the rows; they are weighted and summed per token in expert order, as forward does."""
    cfg = module.cfg
    shape = x.shape
    xf = x.reshape(-1, shape[-1])  # [M, d]
    M, k = xf.shape[0], cfg.top_k
    w, idx = route(module.router(xf), k, cfg.routing)  # [M, k], [M, k]
    per = cfg.experts // ep.size
    order = torch.argsort(idx.flatten(), stable=True)  # assignments grouped by expert (hence by rank)
    expert = idx.flatten()[order]  # [M*k]
    tok = torch.arange(M, device=x.device).repeat_interleave(k)[order]  # [M*k]
    send = torch.bincount(expert // per, minlength=ep.size)  # [ep]
    recv = ep.counts(send)
    send_l, recv_l = send.tolist(), recv.tolist()
    rx = ep.exchange(xf[tok], send_l, recv_l)  # [R, d] rows for this rank's experts
    re = ep.exchange_ids(expert - (expert // per) * per, send_l, recv_l)  # [R] local expert of each row
    gate_w = None if module.experts.gate_proj is None else ep.local(module.experts.gate_proj)  # [E/ep, F, d]
    up_w, down_w = ep.local(module.experts.up_proj), ep.local(module.experts.down_proj)
    ry = torch.zeros_like(rx)  # [R, d]
    for e in range(per):
        rows = torch.where(re == e)[0]
        if rows.numel() == 0:
            continue
        xe = rx[rows]  # [m, d]
        gate = xe @ gate_w[e].t() if gate_w is not None else None  # [m, F]
        ry = ry.index_add(0, rows, activate(cfg.activation, gate, xe @ up_w[e].t()) @ down_w[e].t())
    back = ep.exchange(ry, recv_l, send_l)  # [M*k, d] in `order`
    slot_w = w.flatten()[order, None].to(back.dtype)  # [M*k, 1]
    out = torch.zeros_like(xf).index_add(0, tok, (back * slot_w).to(xf.dtype))  # [M, d]
    return out.view(shape)


def cp_forward(module, x: torch.Tensor, cp) -> torch.Tensor:
    """Token-local: each context-parallel rank runs its own tokens, nothing crosses ranks. (The class's
    forward, not the instance's: under cp the instance's forward is this function.)"""
    return type(module).forward(module, x)


KIND = RuntimeKind(
    name="moe",
    module=MoE,
    build=build,
    new_cache=None,
    ops={},
    oracles={},
    state_names=state_names,
    cp_forward=cp_forward,
    ep_forward=ep_forward,
)
