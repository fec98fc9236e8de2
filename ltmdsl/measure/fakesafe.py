"""Which layer kinds can run on fake tensors, and the static-shape paths some of them need for tracing.

A fake tensor has a shape but no values, so nothing may depend on the data: no `nonzero`/`torch.where(mask)`
whose output size depends on values, no Python branch on a tensor's contents, no `.item()`. Attention (RoPE
scalings that depend on the length are given it as a number), the MLP, the Mamba kinds, MLA, Gated DeltaNet,
KDA, the short convolution, Lightning attention, RG-LRU and mLSTM satisfy this as they are: their chunked
scans loop over T/chunk chunks of static shapes, and nothing reads a value back. The MoE's token dispatch (`torch.where(idx == e)`) does not: for tracing
its forward is replaced by a *balanced* dispatch with static shapes, the router still runs (its logits,
softmax and top-k are traced) but assignment j = token*k + slot of the M*k goes to expert j mod E, so each
expert receives ceil((M*k - e)/E) tokens: the memory of perfectly balanced routing, with no dropped tokens.
Under expert parallelism the same plan gives the all-to-all split sizes in Python (`_balanced_ep_routed`),
and folded at etp > 1 the counts of the rows gathered over the etp group (every etp rank receives as many).

Kinds not listed in TRACE_PATHS have no known fake-safe path and are refused by `check`, naming the kind.
"""

from __future__ import annotations

import types

import torch

from ltmdsl.ir import ModelIR


class NotTraceable(ValueError):
    """The spec's model cannot be traced on fake tensors (a kind without a fake-safe path, an unsupported plan)."""


def _balanced_moe_forward(self, x: torch.Tensor, state=None, pos0: int = 0) -> torch.Tensor:
    """The MoE forward (runtime/kinds/moe.py `MoE.forward`, `ep_forward` under expert parallelism) with the
    static-shape balanced dispatch (module docstring) in place of `torch.where(idx == e)`: the same expert maths
    (biases, clamped SwiGLU, weighted inputs), and the shared expert and its gate (`with_shared`) once the
    routed part has returned and released its temporaries, as the runtime runs them."""
    from ltmdsl.runtime.kinds.moe import with_shared

    shape = x.shape
    xf = x.reshape(-1, shape[-1])  # [M, d]
    if self.expert_parallel is not None:
        out = _balanced_ep_routed(self, xf, self.expert_parallel)  # [M, d]
    else:
        out = _balanced_routed(self, xf)  # [M, d]
    return with_shared(self, xf, out).view(shape)


def _balanced_routed(self, xf: torch.Tensor) -> torch.Tensor:
    """`MoE.routed` with the balanced plan: xf [M, d] -> [M, d]. The router still runs (its logits, softmax
    and top-k are traced); assignment j = token*k + slot goes to expert j mod E."""
    from ltmdsl.runtime.kinds.moe import route

    cfg = self.cfg
    M, k, E = xf.shape[0], cfg.top_k, cfg.experts
    w, _idx = route(self.router(xf), cfg, self.selection_bias)  # [M, k]; indices replaced by the balanced plan
    out = torch.zeros_like(xf)  # [M, d]
    j = torch.arange(M * k, device=xf.device)  # [M*k] assignments
    for e in range(min(E, M * k)):  # experts past M*k receive nothing
        sel = j[e::E]  # [m] static: ceil((M*k - e)/E) assignments
        tok, slot = sel // k, sel % k  # [m], [m]
        we = w[tok, slot, None].to(xf.dtype)  # [m, 1]
        if cfg.weight_input:
            he = self.experts.one(cfg, e, xf[tok] * we)  # [m, d]
        else:
            he = self.experts.one(cfg, e, xf[tok]) * we  # [m, d]
        out.index_add_(0, tok, he.to(out.dtype))
    return out


def _balanced_ep_routed(self, whole: torch.Tensor, ep) -> torch.Tensor:
    """runtime/kinds/moe.py `ep_routed` with the balanced plan: whole [M, d] -> [M, d]. Assignment j goes to
    expert j mod E on every rank, so the all-to-all split sizes are known in Python (no `bincount`, no count
    exchange) and each rank receives, for each of its E/ep experts, the same rows from every rank. The
    runtime's exchanges, expert maths and weighted sum (`ep_experts`) on that plan, folded as `ep_routed` folds:
    under tp this rank's 1/t part dispatched and the parts gathered; at etp > 1 the received rows all-gathered
    over the etp group (each of its ranks receives as many: the same plan on the same number of tokens) and the
    partial outputs reduce-scattered back, so a local expert's rows are its rows of every etp rank's block."""
    from ltmdsl.runtime.kinds.moe import ep_experts, route

    cfg = self.cfg
    w, _idx = route(self.router(whole), cfg, self.selection_bias)  # [M, k]; indices replaced by the balanced plan
    fold = ep.folds(whole.shape[0])
    xf, w = (ep.part(whole), ep.part(w)) if fold else (whole, w)  # folded under tp: this rank's M/t rows
    M, k, E = xf.shape[0], cfg.top_k, cfg.experts
    per = E // ep.size
    rows_of = [len(range(e, M * k, E)) for e in range(E)]  # assignments to expert e from one rank
    order = torch.cat([torch.arange(e, M * k, E, device=xf.device) for e in range(min(E, M * k))])  # [M*k] by expert
    send = [sum(rows_of[r * per:(r + 1) * per]) for r in range(ep.size)]
    recv = [send[ep.rank]] * ep.size  # every rank sends this rank's experts the same rows
    received = sum(recv)
    gathered = None if ep.etp is None else [received] * ep.etp.size()  # folded at etp > 1: the etp group's rows
    starts, at = [], 0
    for block in range(1 if gathered is None else len(gathered)):  # the etp ranks' rows, in etp-rank order
        for _src in range(ep.size):
            for e in range(per):
                starts.append((e, at))
                at += rows_of[ep.rank * per + e]

    def rows(e: int) -> torch.Tensor:  # [m] this expert's rows from every rank (folded at etp > 1: of every block)
        n = rows_of[ep.rank * per + e]
        if n == 0:
            return torch.empty(0, dtype=torch.long, device=xf.device)
        return torch.cat([torch.arange(a, a + n, device=xf.device) for j, a in starts if j == e])

    out = ep_experts(self, xf, w.flatten()[order], order // k, send, recv, rows, ep, gathered)  # [M, d]
    return ep.whole(out) if fold else out  # folded: parts gathered


#: kind -> None (fake-safe as it is) or a forward to bind on its module for tracing.
TRACE_PATHS = {
    "attention": None,
    "mlp": None,
    "mamba": None,
    "mamba2": None,
    "moe": _balanced_moe_forward,
    "mla": None,
    "gated_deltanet": None,
    "kda": None,
    "short_conv": None,
    "lightning": None,
    "rg_lru": None,
    "mlstm": None,
    "parallel": None,  # runs its branches as they are: each must be fake-safe as it is (`check`)
    "transformer_block": None,  # an attention and an MLP, both fake-safe as they are
}

#: What the report says about each substitution.
TRACE_NOTES = {
    "moe": "MoE dispatch traced with balanced routing: token-slot j goes to expert j mod E (static shapes)",
}


def check(ir: ModelIR) -> list[str]:
    """Refuse (NotTraceable, naming the kind) a model with a kind that has no fake-safe path; return the notes
    of the substitutions that tracing this model makes."""
    kinds = list(dict.fromkeys(layer.kind for layer in ir.layers))
    missing = [k for k in kinds if k not in TRACE_PATHS]
    if missing:
        raise NotTraceable(
            f"layer kind {missing[0]!r} has no fake-tensor path, so model {ir.name!r} cannot be traced "
            f"(traceable kinds: {', '.join(TRACE_PATHS)})"
        )
    for layer in ir.layers:  # a parallel layer's branches run unsubstituted
        for name, branch, _, _ in getattr(layer.mixer, "branches", ()):
            if TRACE_PATHS.get(branch.kind, False) is not None:
                raise NotTraceable(f"layer {layer.index} '{layer.definition}': branch {name} ({branch.kind}) of a "
                                   "parallel layer has no fake-tensor path as it is")
    return [TRACE_NOTES[k] for k in kinds if k in TRACE_NOTES]


def prepare(blocks) -> None:
    """Bind the tracing forward of every mixer whose kind needs one (blocks: the LTModel's Block modules)."""
    for block in blocks:
        path = TRACE_PATHS[block.mixer.cfg.kind]
        if path is not None:
            block.mixer.forward = types.MethodType(path, block.mixer)
